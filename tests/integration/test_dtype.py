"""`dtype=bfloat16` is honoured for weights, dummy inputs and request tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import distinct_requests, encode, module_engine, reference_outputs

from vllm_terratorch.samples import sample_pretrained_cfg

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("segmentation")


llm = module_engine(CFG, dtype="bfloat16")


def test_bfloat16_engine_matches_bfloat16_forward(llm):
    requests = distinct_requests(CFG["input"], 8, seed=31)
    outputs = encode(llm, requests)
    assert {o.dtype for o in outputs} == {torch.bfloat16}
    references = reference_outputs(CFG, requests, dtype=torch.bfloat16)
    exact = reference_outputs(CFG, requests)
    for out, ref, full in zip(outputs, references, exact):
        # Same arithmetic as a plain bf16 forward (batching may reorder float sums slightly)...
        assert (out.float() - ref.float()).abs().max() <= 0.1 * full.abs().max()
        # ...and far closer to the float32 result than an unrelated output would be.
        assert (out.float() - full).abs().mean() <= 0.05 * full.abs().mean() + 1e-3
