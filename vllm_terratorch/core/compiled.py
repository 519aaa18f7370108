"""Opt-in compiled forward (`torch.compile`) for networks served at their spec's input shapes.

Why opt in rather than always: compiling takes seconds to minutes per batch size at start-up,
needs a C++ compiler on CPU (Triton on GPU), and pays off only when requests arrive at the shapes
it was compiled for. With `VLLM_TERRATORCH_COMPILE` set (envs.py), the network is compiled once
per batch-size bucket (1, 2, 4, ... up to `max_num_seqs`) at start-up, with inductor's
`freezing` (the loaded weights become constants, so on CPU convolutions and linear layers use
pre-packed oneDNN weights). A batch is padded up to its bucket with copies of its last request and
the padding rows are dropped from the output, so the number of compiled graphs stays bounded and
every request still gets exactly its own output. Inputs of any other shape run eagerly.

`reduce-overhead` / `max-autotune` add CUDA graphs on a GPU: the replayed graph writes its output
into a buffer that the next replay overwrites, so outputs are cloned before vLLM sees them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from vllm_terratorch.log import logger
from vllm_terratorch.core.forward import task_output

# A tensor leaf's trailing shape and dtype: what a compiled graph is specialised on besides batch.
Signature = tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a compiled graph: powers of two below `max_batch`, then `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(count: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `count` requests (None above the largest)."""
    return next((size for size in buckets if size >= count), None)


def pad_batch(tree: Any, count: int, size: int) -> Any:
    """Every batch-leading tensor of `tree` grown from `count` to `size` rows with copies of its
    last row (real-looking values: zeros could take other code paths, e.g. in normalisations)."""
    if size == count:
        return tree

    def pad(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != count:
            return leaf
        return torch.cat([leaf, leaf[-1:].expand(size - count, *leaf.shape[1:])])

    return pytree.tree_map(pad, tree)


def signature(tree: Any) -> Signature:
    return tuple(
        (tuple(leaf.shape[1:]), leaf.dtype) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else None
        for leaf in pytree.tree_leaves(tree)
    )


def _inference_tensors(tree: Any) -> Any:
    """Every tensor of `tree` as an inference tensor (copied only where it is not one).

    Compiled graphs are guarded on the tensors' dispatch keys: vLLM hands over batches built
    outside inference mode, while padded batches and the warm-up's are made inside it. Without
    this, one bucket would compile twice, the second time on a live request (seconds to minutes).
    """
    return pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) and not leaf.is_inference() else leaf, tree)


def _reset_cudagraph_step() -> None:
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()


class CompiledForward:
    """A network's forward compiled per batch bucket at the input shapes it was warmed up with."""

    def __init__(self, network: torch.nn.Module, mode: str, max_batch: int) -> None:
        import torch._dynamo.config as dynamo_config
        import torch._inductor as inductor

        self.mode = mode
        self.buckets = batch_buckets(max_batch)
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune")
        # One graph per bucket is recompilation by design; dynamo's default limit (8) would
        # silently fall back to eager for the larger buckets of a large max_num_seqs.
        limit = len(self.buckets) + 2
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
        options = {**inductor.list_mode_options(mode), "freezing": True}
        self._compiled: Callable[..., Any] = torch.compile(network, dynamic=False, options=options)
        self._signature: Signature | None = None
        self.batches_run = 0  # compiled calls after warm-up (what ran compiled, for logs and tests)

    @property
    def ready(self) -> bool:
        return self._signature is not None

    def warm_up(self, make_batch: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        """Compile every bucket now (start-up) rather than on a request's time.

        `make_batch(n)` gives the forward arguments of `n` dummy requests at the spec's shapes.
        """
        started = time.perf_counter()
        with torch.inference_mode():
            for size in self.buckets:
                args, kwargs = _inference_tensors(make_batch(size))
                self._signature = signature((args, kwargs))
                self._call(args, kwargs)
        logger.info(
            "vllm-terratorch: compiled forward (torch.compile mode=%s, freezing) for batch sizes %s in %.1f s",
            self.mode, list(self.buckets), time.perf_counter() - started,
        )

    def accepts(self, args: tuple[Any, ...], kwargs: dict[str, Any], count: int) -> bool:
        """Whether this batch runs compiled: the warmed-up shapes and at most the largest bucket."""
        return (
            self._signature is not None
            and bucket_for(count, self.buckets) is not None
            and signature((args, kwargs)) == self._signature
        )

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any], count: int) -> torch.Tensor:
        """The task output of `count` requests (padded to their bucket for the call, cut back)."""
        size = bucket_for(count, self.buckets)
        if size is None:
            raise ValueError(f"{count} requests exceed the largest compiled batch ({self.buckets[-1]}); check accepts() first")
        with torch.inference_mode():
            padded_args, padded_kwargs = _inference_tensors(pad_batch((args, kwargs), count, size))
            rows = task_output(self._call(padded_args, padded_kwargs))[:count]
        self.batches_run += 1
        # A replayed CUDA graph writes its next output into this same buffer.
        return rows.clone() if self.cudagraphs else rows

    def _call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if self.cudagraphs:
            _reset_cudagraph_step()
        return self._compiled(*args, **kwargs)


def compiled_state(model: torch.nn.Module) -> dict[str, Any] | None:
    """What the served model's compiled forward is doing, or None when it serves eagerly.

    Importable (so picklable by reference) for `LLM.apply_model(compiled_state)`, which runs it
    in the engine's worker process (vLLM needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 to send it).
    """
    compiled = getattr(model, "compiled", None)
    if not isinstance(compiled, CompiledForward):
        return None
    return {"mode": compiled.mode, "buckets": list(compiled.buckets), "batches_run": compiled.batches_run}
