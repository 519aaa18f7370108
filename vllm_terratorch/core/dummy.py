"""Dummy inputs for vLLM's memory-profiling warm-up, from the `input.data` shape spec."""

from __future__ import annotations

import torch

from vllm_terratorch.core.config import InputSpec


def dummy_inputs(spec: InputSpec, dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One request's worth of inputs, in the model's dtype (not always float16, as upstream).

    Values are fixed pseudo-random numbers rather than constants so that profiling runs the same
    code paths real data does; memory use depends only on the shapes.
    """
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(tensor.shape, generator=generator).to(dtype=dtype, device=device)
        for name, tensor in spec.data.items()
    }
