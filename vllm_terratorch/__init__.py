"""vllm-terratorch: serve TerraTorch geospatial models with vLLM (`--model-impl terratorch`).

Only entry-point functions live here, and they import lazily, so that vLLM loading our plugin in
every process costs nothing until a model is actually built.
"""

from __future__ import annotations

__all__ = ["register"]
__version__ = "0.1.0"


def register() -> None:
    """`vllm.general_plugins` entry point: make our class serve the `Terratorch` architecture.

    Runs in every vLLM process (API server, engine core, workers); safe to call any number of times.
    """
    from vllm_terratorch.compat import ARCHITECTURE, MODEL_CLASS, attach_to_vllm_logging, claim_architecture, logger

    attach_to_vllm_logging()
    if claim_architecture():
        logger.info("vllm-terratorch: architecture %s is served by %s", ARCHITECTURE, MODEL_CLASS)
