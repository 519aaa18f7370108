"""A ClassificationTask (the in-tree model cannot build one) from a safetensors folder."""

from __future__ import annotations

import pytest
from helpers import distinct_requests, encode, module_engine, max_abs_diff, reference_outputs

from vllm_terratorch.testing.samples import sample_pretrained_cfg

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("classification")


llm = module_engine(CFG, "safetensors", max_num_seqs=5)


def test_batched_requests_match_plain_forward(llm):
    requests = distinct_requests(CFG["input"], 12, seed=21)
    outputs = encode(llm, requests)
    assert [tuple(o.shape) for o in outputs] == [(3,)] * 12
    assert max_abs_diff(outputs, reference_outputs(CFG, requests)) <= 1e-4
