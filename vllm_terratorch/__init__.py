"""vllm-terratorch: serve TerraTorch geospatial models with vLLM (`--model-impl terratorch`).

Only entry-point functions live here, and they import lazily, so that vLLM loading our plugin in
every process costs nothing until a model is actually built.
"""

from __future__ import annotations

__all__ = [
    "classification_processor", "register", "regression_processor", "segmentation_processor", "tm_segmentation_processor",
]
__version__ = "0.1.0"


def register() -> None:
    """`vllm.general_plugins` entry point: make our class serve the `Terratorch` architecture.

    Runs in every vLLM process (API server, engine core, workers); safe to call any number of times.
    """
    from vllm_terratorch import registration

    registration.register()


# `vllm.io_processor_plugins` entry points: each returns the qualified name of its processor class.
def _processor(plugin: str) -> str:
    from vllm_terratorch.registration import IO_PROCESSORS

    return IO_PROCESSORS[plugin]


def segmentation_processor() -> str:
    return _processor("terratorch_segmentation")


def tm_segmentation_processor() -> str:
    return _processor("terratorch_tm_segmentation")


def regression_processor() -> str:
    return _processor("terratorch_regression")


def classification_processor() -> str:
    return _processor("terratorch_classification")
