"""The package logger, shared by every layer (importing it never imports vLLM)."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_terratorch")


def attach_to_vllm_logging() -> None:
    """Show our log lines in vLLM's log, formatted like vLLM's own.

    vLLM (0.32) configures handlers on the `vllm` logger only, and only once an engine or server
    starts, which may be after plugins load. Making `vllm` the parent of our package logger routes
    our records through whatever handlers and level vLLM has at the time they are emitted.
    """
    ours = logging.getLogger("vllm_terratorch")
    ours.parent = logging.getLogger("vllm")
