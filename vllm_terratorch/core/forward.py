"""How a batch of requests becomes one `forward(...)` call, and its output one tensor per request.

The calling convention comes from the input spec (mission document): the `target` input is
positional, every other input is a keyword. Without a target, inputs go as keywords when the
network's signature accepts them; a network whose forward needs one positional argument gets the
single image-like input (rank >= 3) positionally and the others as keywords, or, when there are
several images, the dict of inputs, as multimodal TerraTorch models such as TerraMind expect.

Batching: each request carries tensors of exactly the spec's shapes; vLLM stacks them along a new
leading dimension. A keyword input whose spec shape starts with 1 (`location_coords: [1, 2]`) is
already batch-shaped for one request, exactly as upstream passes it, so its batch is the
concatenation of the requests' tensors, i.e. the stacked dims merged. Every request keeps its own
tensors (the in-tree model fed request 0's coordinates to the whole batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm_terratorch.core.config import InputSpec
from vllm_terratorch.errors import ConfigError, InputError


def _forward_parameters(network: torch.nn.Module) -> tuple[list[str], set[str], bool]:
    """(required positional-or-keyword names, accepted keyword names, has **kwargs)."""
    parameters = inspect.signature(network.forward).parameters.values()
    required = [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    keywords = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return required, keywords, var_keyword


@dataclass(frozen=True)
class ForwardPlan:
    """The calling convention of one network, decided once at start-up."""

    names: tuple[str, ...]
    positional: str | None = None
    dict_positional: bool = False
    merged: frozenset[str] = frozenset()

    @classmethod
    def for_network(cls, spec: InputSpec, network: torch.nn.Module) -> ForwardPlan:
        names = tuple(spec.data)
        positional = spec.target
        dict_positional = False
        if positional is None:
            required, keywords, var_keyword = _forward_parameters(network)
            unmet = [name for name in required if name not in spec.data]
            images = [name for name in names if len(spec.data[name].shape) >= 3]
            if len(unmet) == 1:
                if len(names) == 1:
                    positional = names[0]
                elif len(images) == 1:
                    # The mission's no-target example: forward(x, **kwargs) with pixel_values
                    # and location_coords; the one image is the positional input.
                    positional = images[0]
                else:
                    dict_positional = True
            elif unmet:
                raise ConfigError(
                    f"pretrained_cfg.input: {type(network).__name__}.forward needs {unmet}, "
                    f"which input.data ({list(names)}) does not provide; name the inputs after them or set target"
                )
            refused = set(names) - {positional} - keywords
            if not dict_positional and not var_keyword and refused:
                raise ConfigError(
                    f"pretrained_cfg.input: {type(network).__name__}.forward accepts no keyword(s) "
                    f"{sorted(refused)}; set target or rename the inputs"
                )
        merged = frozenset(
            name for name in names if name != positional and not dict_positional and spec.data[name].shape[0] == 1
        )
        return cls(names=names, positional=positional, dict_positional=dict_positional, merged=merged)

    def describe(self) -> str:
        if self.dict_positional:
            return "forward({" + ", ".join(self.names) + "})"
        parts = [self.positional] if self.positional else []
        parts += [f"{name}={name}" for name in self.names if name != self.positional]
        return "forward(" + ", ".join(parts) + ")"

    def batch(
        self,
        inputs: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments for a batch, from vLLM's per-input batched tensors."""
        tensors: dict[str, torch.Tensor] = {}
        for name in self.names:
            if name not in inputs:
                raise InputError(f"the batch has no {name!r} input (inputs: {sorted(inputs)})")
            value = inputs[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.stack(list(value))
            if tensor.is_floating_point():
                tensor = tensor.to(device=device, dtype=dtype, non_blocking=True)
            else:
                tensor = tensor.to(device=device, non_blocking=True)
            tensors[name] = tensor.flatten(0, 1) if name in self.merged else tensor
        if self.dict_positional:
            return (tensors,), {}
        if self.positional is None:
            return (), tensors
        return (tensors.pop(self.positional),), tensors


def task_output(output: Any) -> torch.Tensor:
    """The task's prediction tensor from whatever the network returned (ModelOutput, dict, tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    for candidate in (getattr(output, "output", None), output.get("output") if isinstance(output, Mapping) else None):
        if isinstance(candidate, torch.Tensor):
            return candidate
    raise InputError(f"the network returned {type(output).__name__}, which holds no `output` tensor")


def split_by_shape(
    inputs: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], names: Sequence[str]
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Groups of requests whose inputs share shapes, each stacked: (request indices, inputs).

    vLLM stacks equally-shaped items into one tensor and leaves a list when shapes differ (images
    of different sizes in one step). Each group runs as one forward; order is restored after.
    """
    if all(isinstance(inputs[name], torch.Tensor) for name in names):
        count = len(inputs[names[0]])
        return [(list(range(count)), {name: inputs[name] for name in names})]  # type: ignore[misc]
    items = {name: list(inputs[name]) for name in names}
    count = len(items[names[0]])
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for index in range(count):
        key = tuple(tuple(items[name][index].shape) for name in names)
        groups.setdefault(key, []).append(index)
    return [
        (indices, {name: torch.stack([items[name][i] for i in indices]) for name in names})
        for indices in groups.values()
    ]


def identical_requests(inputs: Mapping[str, Any]) -> bool:
    """Whether every request of the batch carries the same inputs (as vLLM's dummy requests do)."""
    for value in inputs.values():
        items = list(value) if isinstance(value, (torch.Tensor, list, tuple)) else [value]
        first = items[0] if items else None
        for item in items[1:]:
            if not (isinstance(item, torch.Tensor) and isinstance(first, torch.Tensor)):
                return False
            if item.shape != first.shape or not torch.equal(item, first):
                return False
    return True


def one_row_per_token(rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`num_tokens` rows, each the first request's output, without copying.

    Served requests are one token each, so `forward` returns one row per request and token. Only
    vLLM's profiling run (`_dummy_run(max_num_tokens)`, called at start-up by vLLM 0.26's CPU
    runner and by the GPU runners) spreads `max_num_batched_tokens` tokens over `max_num_seqs`
    requests and indexes the output per token. Those requests all carry the same dummy item, so
    their outputs are equal and a zero-copy expansion of the first row answers every token,
    without allocating `max_num_batched_tokens` outputs. The network itself still ran on the full
    dummy batch, which is the memory profile that matters. (A batch padded with extra tokens whose
    requests differ keeps its one row per request: vLLM reads only the first rows of it.)
    """
    return rows[:1].expand(num_tokens, *rows.shape[1:])


def pad_and_stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    batch = tensors[0].new_zeros((len(tensors), *shape))
    for row, tensor in zip(batch, tensors):
        row[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return batch
