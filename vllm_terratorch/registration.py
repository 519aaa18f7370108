"""What vLLM serves with our code, and the guards that keep it so whatever the plugin order.

The task table below is the one place that says which IO processor serves which TerraTorch task.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_terratorch.core.config import ARCHITECTURE
from vllm_terratorch.engine.compat import wrap_once
from vllm_terratorch.log import logger

MODEL_CLASS = "vllm_terratorch.engine.model:TerratorchModel"


@dataclass(frozen=True)
class TaskKind:
    """One kind of TerraTorch task we serve: its IO processor and what a prediction is saved as."""

    plugin: str  # the IO processor's name (TerraTorch's, so documented commands keep working)
    processor: str  # qualified name of our class behind it (a vLLM IOProcessor)
    pipeline: str  # qualified name of the vLLM-free GeoTIFF pipeline it wraps (what `predict` runs)
    tasks: tuple[str, ...]  # TerraTorch task classes (last component of pretrained_cfg.model.class_path)
    suffix: str  # file suffix of a saved prediction (`predict`)
    aliases: tuple[str, ...] = ()  # other names it answers to, for clients written for them


TASK_KINDS = (
    TaskKind(
        "terratorch_segmentation",
        "vllm_terratorch.io.processor.SegmentationProcessor",
        "vllm_terratorch.io.tasks.SegmentationPipeline",
        ("SemanticSegmentationTask",),
        ".tif",
        # TerraTorch's TerraMind processor: ours reads one input per modality (the request decides).
        ("terratorch_tm_segmentation",),
    ),
    TaskKind(
        "terratorch_regression",
        "vllm_terratorch.io.processor.RegressionProcessor",
        "vllm_terratorch.io.tasks.RegressionPipeline",
        ("PixelwiseRegressionTask",),
        ".tif",
    ),
    TaskKind(
        "terratorch_classification",
        "vllm_terratorch.io.processor.ClassificationProcessor",
        "vllm_terratorch.io.tasks.ClassificationPipeline",
        ("ClassificationTask", "MultiLabelClassificationTask"),
        ".json",
    ),
)
IO_PROCESSORS = {name: kind.processor for kind in TASK_KINDS for name in (kind.plugin, *kind.aliases)}
PLUGINS = tuple(IO_PROCESSORS)


def task_kind(plugin: str) -> TaskKind:
    return next(kind for kind in TASK_KINDS if plugin in (kind.plugin, *kind.aliases))


def pipeline_class(plugin: str) -> type:
    """The GeoTIFF pipeline class behind IO processor `plugin` (imports no vLLM)."""
    import importlib

    module, _, name = task_kind(plugin).pipeline.rpartition(".")
    return getattr(importlib.import_module(module), name)


def kind_for_task(class_path: str) -> TaskKind | None:
    """The task kind serving `class_path` (dotted or bare class name), None if no processor fits."""
    name = class_path.rsplit(".", 1)[-1]
    return next((kind for kind in TASK_KINDS if name in kind.tasks), None)


def register() -> None:
    """Make our class serve `Terratorch` and our processors answer to their names, in this process."""
    from vllm_terratorch.engine.compat import (
        eager_forward,
        steps_within_the_execute_timeout,
        terratorch_cpu_defaults,
        worker_in_engine_process,
    )
    from vllm_terratorch.log import attach_to_vllm_logging

    attach_to_vllm_logging()
    if claim_architecture():
        logger.info("vllm-terratorch: architecture %s is served by %s", ARCHITECTURE, MODEL_CLASS)
    claim_io_processors(IO_PROCESSORS)
    terratorch_cpu_defaults()
    worker_in_engine_process()
    eager_forward()
    steps_within_the_execute_timeout()


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

    register = ModelRegistry.register_model

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
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

        return guarded

    if not wrap_once(ModelRegistry, "register_model", wrap):
        return False
    register(ARCHITECTURE, MODEL_CLASS)
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

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(group: str) -> dict[str, Any]:
            plugins = current(group)
            if group == IO_PROCESSOR_PLUGINS_GROUP:
                for name, qualname in processors.items():
                    if name in plugins:
                        plugins[name] = functools.partial(str, qualname)
                        logger.info("vllm-terratorch: IO processor %s is served by %s", name, qualname)
            return plugins

        return guarded

    wrap_once(io_processors, "load_plugins_by_group", wrap)
