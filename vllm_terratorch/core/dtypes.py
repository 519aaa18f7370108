"""Dtype names as users type them (`--dtype bf16`) and as we print them (`bfloat16`), in one place."""

from __future__ import annotations

import torch

from vllm_terratorch.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "float64": torch.float64,  # what `predict` decodes at before the engine's dtype is known
}


def parse_dtype(name: str) -> torch.dtype:
    """`--dtype` value -> torch dtype (short and long spellings)."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype | str) -> str:
    """`torch.bfloat16` -> "bfloat16" (as vLLM's `--dtype` and config.json's `torch_dtype` spell it)."""
    return str(dtype).removeprefix("torch.")
