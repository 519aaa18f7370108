"""Checkpoint files -> a state dict that matches the network built from the config.

Handles Lightning checkpoints (`.ckpt`/`.pt` with `state_dict` and `model.` prefixes), plain
state dicts and `.safetensors`; keys of older TerraTorch layouts are mapped (`legacy`). Loading
is strict by default: a checkpoint that does not fit the config is an error naming the keys,
never a silently half-random model.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vllm_terratorch.errors import ModelSourceError, WeightsError
from vllm_terratorch.core.legacy import rename_checkpoint_keys

logger = logging.getLogger(__name__)

# In priority order: the first pattern with matches wins.
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.ckpt", "*.pt", "*.pth", "*.bin")
# Keys under which wrappers commonly keep the weights.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Lightning tasks keep the network under `model.`; other task state (loss weights) is not needed.
TASK_PREFIX = "model."
_SHOWN = 5


def find_weight_files(folder: Path) -> list[Path]:
    """The checkpoint file(s) of a model folder: safetensors shards, or exactly one other file."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if not files:
            continue
        if pattern == "*.safetensors":
            index = folder / "model.safetensors.index.json"
            if index.is_file():
                names = set(json.loads(index.read_text())["weight_map"].values())
                files = [folder / name for name in sorted(names)]
            return files
        if len(files) > 1:
            raise ModelSourceError(
                f"{folder} holds several {pattern} checkpoints ({', '.join(f.name for f in files)}); "
                "keep exactly one, or export the model to model.safetensors with `vllm-terratorch export`"
            )
        return files
    raise ModelSourceError(
        f"{folder} has no weights: expected one of {', '.join(WEIGHT_PATTERNS)} beside config.json"
    )


class _Opaque:
    """Stands in for any non-tensor object in a checkpoint (hyper-parameters, loops' state)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque()


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("torch", "Size"),
    ("torch", "device"),
}


class _InertUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds tensors but turns every other class or function into `_Opaque`.

    Lightning checkpoints often carry objects (jsonargparse namespaces, callbacks) that
    `weights_only=True` refuses; executing their pickled code would let a checkpoint run anything.
    We need only the tensors, so everything else becomes inert.
    """

    def find_class(self, module: str, name: str) -> Any:
        is_rebuild = module == "torch._utils" and name.startswith("_rebuild")
        is_storage = module in ("torch", "torch.storage") and name.endswith("Storage")
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _ALLOWED_GLOBALS or is_rebuild or is_storage or is_dtype:
            return super().find_class(module, name)
        return _Opaque


class _InertPickleModule:
    Unpickler = _InertUnpickler
    load = pickle.load
    __name__ = "vllm_terratorch_inert_pickle"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        logger.info("%s holds non-tensor objects; reading only its tensors", path.name)
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_InertPickleModule)
        except Exception as error:  # noqa: BLE001 - any failure here means an unreadable file
            raise WeightsError(f"cannot read checkpoint {path}: {error}") from None
    except RuntimeError as error:
        raise WeightsError(f"cannot read checkpoint {path} (corrupt or not a PyTorch file): {error}") from None


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint object (Lightning or plain)."""
    if _is_tensor_map(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if _is_tensor_map(inner):
                return dict(inner)
    keys = list(obj)[:_SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(
        f"{path} holds no state dict: expected tensors at top level or under one of "
        f"{_WRAPPER_KEYS}, found {keys}"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one checkpoint file, as saved (prefixes untouched)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own untyped errors
            raise WeightsError(f"cannot read {path}: {error}") from None
    return _unwrap(_torch_load(path), path)


def load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's checkpoint file(s), merged."""
    state: dict[str, torch.Tensor] = {}
    for path in find_weight_files(folder):
        state.update(read_state_dict(path))
    return state


def _strip_task_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(TASK_PREFIX) :]: v for k, v in state.items() if k.startswith(TASK_PREFIX)}


def _listing(names: set[str]) -> str:
    shown = ", ".join(sorted(names)[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def match_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Map checkpoint keys onto the network's keys and check that they fit.

    A Lightning task checkpoint names the network `model.*` (plus task state such as loss
    weights, which inference does not need); a plain network state dict has no prefix. The
    reading that matches more of the network's keys wins.
    """
    as_task = _strip_task_prefix(state)
    candidates = [as_task, dict(state)] if as_task else [dict(state)]
    mapped = max(candidates, key=lambda c: len(c.keys() & expected.keys()))
    if mapped is as_task and len(as_task) < len(state):
        logger.info("%s: ignoring %d task-level tensors outside the network", source, len(state) - len(as_task))
    mapped = rename_checkpoint_keys(mapped, expected.keys(), source=source)

    result: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for name, tensor in mapped.items():
        if name not in expected:
            continue
        want = expected[name].shape
        if tensor.shape != want:
            if name.endswith("pos_embed"):
                # Fixed sin-cos table sized for the training image size; the network
                # recomputes it for the configured size, so the built one is kept.
                logger.info("%s: keeping the model's %s %s (checkpoint has %s)", source, name, tuple(want), tuple(tensor.shape))
                result[name] = expected[name]
                continue
            mismatched.append(f"{name} {tuple(tensor.shape)} vs model {tuple(want)}")
            continue
        result[name] = tensor
    missing = set(expected) - set(result)
    unexpected = set(mapped) - set(expected)
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:_SHOWN]))
    if strict and missing:
        problems.append(f"{len(missing)} model tensors missing from the checkpoint: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors the model does not have: {_listing(unexpected)}")
    if not strict and (missing or unexpected):
        logger.warning(
            "%s: non-strict load (VLLM_TERRATORCH_STRICT_WEIGHTS=0): %d model tensors keep their "
            "initial values (%s); %d checkpoint tensors ignored (%s)",
            source, len(missing), _listing(missing), len(unexpected), _listing(unexpected),
        )
    if problems:
        raise WeightsError(
            f"{source} does not fit the model built from pretrained_cfg.model:\n  "
            + "\n  ".join(problems)
            + "\nCheck that config.json comes from the same TerraTorch config as the checkpoint."
        )
    return result


def load_folder_weights(network: torch.nn.Module, folder: Path, *, strict: bool = True) -> int:
    """Load a model folder's checkpoint into `network` (matched and checked as above); returns
    the number of tensors loaded."""
    state = match_state_dict(load_checkpoint(folder), network.state_dict(), strict=strict, source=str(folder))
    network.load_state_dict(state, strict=False)
    return len(state)
