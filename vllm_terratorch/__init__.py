"""vllm-terratorch: serve TerraTorch geospatial models with vLLM (`--model-impl terratorch`).

Only entry-point functions live here, and they import lazily, so that vLLM loading our plugin in
every process costs nothing until a model is actually built.
"""

from __future__ import annotations

__all__ = ["IO_PROCESSORS", "classification_processor", "register", "regression_processor", "segmentation_processor"]
__version__ = "0.1.0"


def register() -> None:
    """`vllm.general_plugins` entry point: make our class serve the `Terratorch` architecture.

    Runs in every vLLM process (API server, engine core, workers); safe to call any number of times.
    """
    from vllm_terratorch.compat import (
        ARCHITECTURE,
        MODEL_CLASS,
        attach_to_vllm_logging,
        claim_architecture,
        claim_io_processors,
        float32_on_cpu_by_default,
        logger,
        steps_within_the_execute_timeout,
    )

    attach_to_vllm_logging()
    if claim_architecture():
        logger.info("vllm-terratorch: architecture %s is served by %s", ARCHITECTURE, MODEL_CLASS)
    claim_io_processors(IO_PROCESSORS)
    float32_on_cpu_by_default()
    steps_within_the_execute_timeout()


# `vllm.io_processor_plugins` entry points: each returns the qualified name of its processor class.
IO_PROCESSORS = {
    "terratorch_segmentation": "vllm_terratorch.io.processor.SegmentationProcessor",
    "terratorch_regression": "vllm_terratorch.io.processor.RegressionProcessor",
    "terratorch_classification": "vllm_terratorch.io.processor.ClassificationProcessor",
}


def segmentation_processor() -> str:
    return IO_PROCESSORS["terratorch_segmentation"]


def regression_processor() -> str:
    return IO_PROCESSORS["terratorch_regression"]


def classification_processor() -> str:
    return IO_PROCESSORS["terratorch_classification"]
