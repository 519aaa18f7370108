"""The mission's segmentation config shape (UperNet, decoder_scale_modules, backbone_pretrained,
target + location_coords) through a real vLLM engine, many requests batched together."""

from __future__ import annotations

import pytest
import torch
from helpers import distinct_requests, encode, module_engine, max_abs_diff, reference_outputs

from vllm_terratorch.testing.samples import sample_pretrained_cfg

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("segmentation")


# max_num_seqs < request count: several engine steps, each a batch of distinct requests.
llm = module_engine(CFG, "ckpt", max_num_seqs=4, in_process=False)  # vLLM's default processes, as the README runs it


def test_batched_requests_match_plain_forward(llm):
    requests = distinct_requests(CFG["input"], 10, seed=1)
    outputs = encode(llm, requests)
    assert [tuple(o.shape) for o in outputs] == [(2, 64, 64)] * 10
    assert max_abs_diff(outputs, reference_outputs(CFG, requests)) <= 1e-4


def test_each_request_uses_its_own_coordinates(llm):
    # Same image, different coordinates: outputs must differ (the in-tree model used request 0's).
    base = distinct_requests(CFG["input"], 1, seed=2)[0]
    requests = [dict(base, location_coords=torch.tensor([[lon, 10.0]])) for lon in (-150.0, -60.0, 30.0, 120.0, 170.0, 0.0, 45.0, -5.0)]
    outputs = encode(llm, requests)
    assert max_abs_diff(outputs, reference_outputs(CFG, requests)) <= 1e-4
    assert (outputs[0] - outputs[3]).abs().max() > 1e-3


def test_duplicates_and_upstream_request_forms(llm):
    # Upstream's example sends float16 tensors; some users add a batch dim of 1. Both work.
    requests = distinct_requests(CFG["input"], 3, seed=3)
    upstream = {k: v.to(torch.float16) for k, v in requests[0].items()}
    with_batch_dim = {"pixel_values": requests[1]["pixel_values"][None], "location_coords": requests[1]["location_coords"]}
    sent = [requests[2], upstream, requests[2], with_batch_dim, requests[2]]
    outputs = encode(llm, sent)
    expected_inputs = [requests[2], {k: v.float() for k, v in upstream.items()}, requests[2], requests[1], requests[2]]
    assert max_abs_diff(outputs, reference_outputs(CFG, expected_inputs)) <= 1e-4


def test_mixed_image_sizes_in_one_call(llm):
    small = distinct_requests(CFG["input"], 3, seed=4, size=32)
    large = distinct_requests(CFG["input"], 3, seed=5)
    sent = [small[0], large[0], small[1], large[1], small[2], large[2]]
    outputs = encode(llm, sent)
    assert [o.shape[-1] for o in outputs] == [32, 64, 32, 64, 32, 64]
    assert max_abs_diff(outputs, reference_outputs(CFG, sent)) <= 1e-4


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"pixel_values": torch.zeros(6, 64, 64)}, "missing ['location_coords']"),
        ({"pixel_values": torch.zeros(4, 64, 64), "location_coords": torch.zeros(1, 2)}, "pretrained_cfg.input.data.pixel_values.shape"),
        ({"pixel_values": torch.zeros(6, 64, 64), "location_coords": torch.zeros(1, 2), "extra": torch.zeros(1)}, "unknown ['extra']"),
    ],
)
def test_bad_request_is_rejected_and_engine_keeps_serving(llm, inputs, message):
    with pytest.raises(ValueError, match=None) as error:
        encode(llm, [inputs])
    assert message in str(error.value)
    good = distinct_requests(CFG["input"], 1, seed=6)
    assert max_abs_diff(encode(llm, good), reference_outputs(CFG, good)) <= 1e-4


def test_a_request_the_network_cannot_run_fails_alone(llm):
    # 8x8 passes the spec check (spatial dims are free) but is too small for UperNet's padding.
    good = distinct_requests(CFG["input"], 2, seed=7)
    tiny = distinct_requests(CFG["input"], 1, seed=8, size=8)[0]
    outputs = encode(llm, [good[0], tiny, good[1]])
    assert torch.isnan(outputs[1]).all()
    assert max_abs_diff([outputs[0], outputs[2]], reference_outputs(CFG, good)) <= 1e-4
    assert max_abs_diff(encode(llm, good), reference_outputs(CFG, good)) <= 1e-4  # engine still up
