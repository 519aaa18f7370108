"""A pixel-wise regression model with no `target`: every input is passed as a keyword."""

from __future__ import annotations

import pytest
from helpers import distinct_requests, encode, module_engine, max_abs_diff, reference_outputs

from vllm_terratorch.testing.samples import sample_pretrained_cfg

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("regression")


llm = module_engine(CFG, "pt")


def test_batched_requests_match_plain_forward(llm):
    assert "target" not in CFG["input"]
    requests = distinct_requests(CFG["input"], 9, seed=11)
    outputs = encode(llm, requests)
    assert [tuple(o.shape) for o in outputs] == [(64, 64)] * 9
    assert max_abs_diff(outputs, reference_outputs(CFG, requests)) <= 1e-4
