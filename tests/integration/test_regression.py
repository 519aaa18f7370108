"""A pixel-wise regression model with no `target`: every input is passed as a keyword."""

from __future__ import annotations

import pytest
from helpers import distinct_requests, encode, engine, max_abs_diff, reference_outputs

from vllm_terratorch.samples import sample_pretrained_cfg, write_model_folder

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("regression")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    assert "target" not in CFG["input"]
    folder = write_model_folder(tmp_path_factory.mktemp("reg"), CFG, weight_format="pt")
    with engine(folder) as llm:
        yield llm


def test_batched_requests_match_plain_forward(llm):
    requests = distinct_requests(CFG["input"], 9, seed=11)
    outputs = encode(llm, requests)
    assert [tuple(o.shape) for o in outputs] == [(64, 64)] * 9
    assert max_abs_diff(outputs, reference_outputs(CFG, requests)) <= 1e-4
