"""Every environment variable vllm-terratorch reads, in one place, with its default and meaning."""

from __future__ import annotations

import os


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def strict_weights() -> bool:
    """VLLM_TERRATORCH_STRICT_WEIGHTS (default 1): a checkpoint must match the built model exactly.

    Set to 0 to load checkpoints that lack or add a few keys (the differences are still logged as
    a warning); shape mismatches are always an error.
    """
    return _flag("VLLM_TERRATORCH_STRICT_WEIGHTS", True)


def io_config_json() -> str:
    """VLLM_TERRATORCH_IO_CONFIG: JSON object configuring our IO processors (see io/settings.py).

    For compatibility, TerraTorch's TERRATORCH_SEGMENTATION_IO_PROCESSOR_CONFIG is read when ours
    is not set (its `output_path` key means the same thing).
    """
    return os.environ.get("VLLM_TERRATORCH_IO_CONFIG") or os.environ.get(
        "TERRATORCH_SEGMENTATION_IO_PROCESSOR_CONFIG", "{}"
    )
