"""Server-side settings of our IO processors: where outputs go and how much a request may ask for.

Read once at start-up from VLLM_TERRATORCH_IO_CONFIG (JSON). Which local paths and URL hosts a
request may read is not configured here: it follows vLLM's own `--allowed-local-media-path` and
`--allowed-media-domains`, so one policy covers every model the server runs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from vllm_terratorch import envs
from vllm_terratorch.errors import ConfigError


class IOSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    output_path: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "vllm-terratorch-outputs")
    """Folder where `out_data_format: path` outputs are written (created if missing)."""
    allowed_output_paths: list[Path] = Field(default_factory=list)
    """More folders (existing) where a request's absolute `out_path` directory may lie (e.g. a shared volume)."""
    mask_encoding: Literal["ids", "terratorch"] = "ids"
    """Segmentation GeoTIFF values: class ids with nodata 255 (ours), or TerraTorch's `class * 255` with nodata 0."""
    max_pixels: PositiveInt = 100_000_000
    """Largest image (height x width) a request may send; checked from the header, before decoding."""
    max_raster_bytes: PositiveInt = 2 * 1024**3
    """Largest decoded image (height x width x bands x bytes per sample); checked from the header."""
    max_bytes: PositiveInt = 512 * 1024 * 1024
    """Largest encoded input (file, download or base64 payload) in bytes."""
    url_timeout_s: PositiveFloat = 10.0
    """Wall-clock limit of a `data_format: url` download (connect, redirects and body together)."""
    max_concurrent_downloads: PositiveInt = 8
    """Downloads in flight at once; further URL requests wait for a slot (up to `url_timeout_s`)."""
    io_workers: PositiveInt = 8
    """Threads that read, decode, tile, stitch and encode requests, off vLLM's event loop."""
    url_max_redirects: int = Field(default=3, ge=0, le=10)
    """Redirects followed for a download; each hop is checked against the allowed domains."""


def load_io_settings(text: str | None = None) -> IOSettings:
    """Parse settings JSON (VLLM_TERRATORCH_IO_CONFIG by default) and prepare the output folder."""
    text = envs.io_config_json() if text is None else text
    try:
        raw = json.loads(text or "{}")
        settings = IOSettings.model_validate(raw)
    except (json.JSONDecodeError, ValidationError) as error:
        raise ConfigError(
            f"VLLM_TERRATORCH_IO_CONFIG is not valid: {error}. Expected a JSON object with any of "
            f"{sorted(IOSettings.model_fields)}"
        ) from None
    settings.output_path.mkdir(parents=True, exist_ok=True)
    missing = [str(path) for path in settings.allowed_output_paths if not path.is_absolute() or not path.is_dir()]
    if missing:
        raise ConfigError(
            f"VLLM_TERRATORCH_IO_CONFIG: allowed_output_paths {missing} are not existing absolute directories; "
            "create them or remove them from the list"
        )
    return settings
