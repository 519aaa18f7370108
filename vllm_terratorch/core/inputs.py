"""Validation of one request's input tensors against the model's input spec.

Runs in the front-end process when vLLM parses a request, so a bad request fails there with a
`ValueError` (HTTP 400 when served) naming the input and the expected shape, instead of a shape
error inside the batched forward that would fail every request batched with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vllm_terratorch.core.config import InputSpec
from vllm_terratorch.errors import InputError

# A request reaches the model as one multimodal item of this modality, whose fields are the named
# input tensors, behind a one-token prompt (the model is attention-free; the token is a placeholder).
MODALITY = "image"
PROMPT_TOKEN_IDS = (1,)


def tensor_prompt(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The offline / plugin prompt for one request's named input tensors."""
    return {"prompt_token_ids": list(PROMPT_TOKEN_IDS), "multi_modal_data": {MODALITY: dict(inputs)}}


def tile_prompts(tiles: Mapping[str, torch.Tensor], extras: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One prompt per tile: {input: (n, ...)} stacked tiles, plus the inputs every tile shares."""
    count = len(next(iter(tiles.values())))
    return [tensor_prompt({name: stacked[index] for name, stacked in tiles.items()} | dict(extras)) for index in range(count)]


# Trailing dims of image-like inputs (rank >= 3) are spatial; they may differ from the spec
# (the networks interpolate position embeddings); every other dim must match exactly.
SPATIAL_DIMS = 2


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple, int, float)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError) as error:
            raise InputError(f"input {name!r}: cannot be read as a tensor ({error})") from None
    raise InputError(f"input {name!r}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def _fit_shape(name: str, tensor: torch.Tensor, expected: list[int]) -> torch.Tensor:
    """`tensor` with the spec's rank; a leading batch dim of 1 is dropped (one request = one item)."""
    if tensor.dim() == len(expected) + 1 and tensor.shape[0] == 1:
        tensor = tensor[0]
    shape = list(tensor.shape)
    fixed = len(expected) - SPATIAL_DIMS if len(expected) >= 3 else len(expected)
    if len(shape) != len(expected) or shape[:fixed] != expected[:fixed] or 0 in shape:
        free = " (the last two, spatial, dims may differ)" if fixed < len(expected) else ""
        raise InputError(
            f"input {name!r} has shape {shape}, but the model's input spec "
            f"(pretrained_cfg.input.data.{name}.shape) is {expected}{free}"
        )
    return tensor


def validate_request_inputs(
    data: Mapping[str, Any], spec: InputSpec, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The request's tensors, checked against `spec` and cast to the model's dtype."""
    if not isinstance(data, Mapping):
        raise InputError(f"expected a dict of input tensors {sorted(spec.data)}, got {type(data).__name__}")
    missing = [name for name in spec.data if name not in data]
    unknown = [name for name in data if name not in spec.data]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unknown {unknown}")
        raise InputError(
            f"request inputs {sorted(data)} do not match the model's input spec: {'; '.join(parts)}. "
            f"Send exactly {list(spec.data)} (pretrained_cfg.input.data)"
        )
    tensors = {}
    for name, tensor_spec in spec.data.items():
        tensor = _fit_shape(name, _as_tensor(name, data[name]), tensor_spec.shape)
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise InputError(f"input {name!r} has dtype {tensor.dtype}; send real numbers")
        # Every TerraTorch input is real-valued; integers (e.g. coordinates sent as a list of
        # ints) are cast too, so the network never sees a dtype other than its own.
        tensors[name] = tensor.to(dtype).contiguous()
    return tensors
