"""`VLLM_TERRATORCH_COMPILE=1` through a real engine: the compiled forward serves every batch at
the spec's shape (padded to its bucket), other shapes eagerly, and every request gets exactly the
plain PyTorch output of its own inputs."""

from __future__ import annotations

import pytest
from helpers import distinct_requests, encode, engine, max_abs_diff, reference_outputs

from vllm_terratorch.core.compiled import compiled_state
from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("segmentation")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = write_model_folder(tmp_path_factory.mktemp("model"), CFG, weight_format="ckpt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_TERRATORCH_COMPILE", "1")
        # apply_model ships a function to the engine's worker process (pickled by value).
        patch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        with engine(folder, max_num_seqs=4) as running:
            yield running


def state(llm):
    return llm.apply_model(compiled_state)[0]


def test_compiled_at_start_up_for_every_bucket(llm):
    now = state(llm)
    assert now is not None, "the compiled forward fell back to eager (see the engine log)"
    assert (now["mode"], now["buckets"]) == ("default", [1, 2, 4])


def test_batched_requests_match_plain_forward(llm):
    # 7 requests, max_num_seqs 4: steps of 4 and 3 (padded to 4), each request its own output.
    before = state(llm)["batches_run"]
    requests = distinct_requests(CFG["input"], 7, seed=21)
    outputs = encode(llm, requests)
    assert max_abs_diff(outputs, reference_outputs(CFG, requests)) <= 1e-4
    assert state(llm)["batches_run"] >= before + 2


def test_other_sizes_run_eagerly_and_correctly(llm):
    small = distinct_requests(CFG["input"], 2, seed=22, size=32)
    large = distinct_requests(CFG["input"], 2, seed=23)
    sent = [small[0], large[0], small[1], large[1]]
    outputs = encode(llm, sent)
    assert [o.shape[-1] for o in outputs] == [32, 64, 32, 64]
    assert max_abs_diff(outputs, reference_outputs(CFG, sent)) <= 1e-4
