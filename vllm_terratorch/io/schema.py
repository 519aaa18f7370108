"""The `/pooling` request `data` and response `data` of our IO processors (mission document schema)."""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, computed_field, field_validator

from vllm_terratorch.core.config import describe_validation_error
from vllm_terratorch.errors import RequestError
from vllm_terratorch.log import logger

DataFormat = Literal["url", "path", "b64_json"]
OutDataFormat = Literal["path", "b64_json"]


# Frames of one time-series request at most (a model takes as many as its config says).
MAX_FRAMES = 64
# Modalities of one multi-modal request at most (TerraMind has 9 input modalities).
MAX_MODALITIES = 16

# What upstream clients send as `image_format` (vLLM's examples "tiff", TerraTorch's tests ""); the
# field selects nothing (every input is read as a GeoTIFF), so only values naming TIFF are accepted.
IMAGE_FORMATS = ("", "tiff", "tif", "geotiff", "geotif", "cog")


class GeoTiffRequest(BaseModel):
    """`request["data"]`: one GeoTIFF in (or one per time step, or one per modality), one prediction out.

    Fields we do not read are ignored (logged at debug level), as upstream's processors do, so
    clients written for them keep working; every field we read is validated strictly.
    """

    model_config = ConfigDict(extra="ignore")

    data: str | list[str] | dict[str, str]
    """The URL, the local path, or the base64-encoded GeoTIFF, as `data_format` says; for a
    multi-temporal model, a list of them in time order (one per frame, all on one grid); for a
    multi-modal model, an object with one per modality (`{"S2L2A": ..., "S1RTC": ...}`), or with
    `data_format: "path"` a folder holding one sub-folder per modality (upstream's layout)."""
    data_format: DataFormat
    out_data_format: OutDataFormat = "b64_json"
    image_format: str = "geoTiff"
    """Ignored beyond this check: any case of "", tiff, tif, geotiff (the input is always read as a GeoTIFF)."""
    indices: list[int] | None = None
    """Band indices (0-based) to take from the file, in model order; default: from the config."""
    dates: list[date] | None = None
    """Acquisition dates (ISO, one per frame) for files with neither a TIFFTAG_DATETIME tag nor a
    date in their name; a file's own date comes first."""
    out_path: str | None = None
    """For `path` outputs: a relative file name (or sub-path) inside the server's output folder, or an
    existing directory (absolute, inside an allowed output root) that gets `<request_id>.tiff`."""

    @field_validator("data")
    @classmethod
    def _items_given(cls, value: str | list[str] | dict[str, str]) -> str | list[str] | dict[str, str]:
        if isinstance(value, dict):
            if not value or len(value) > MAX_MODALITIES:
                raise ValueError(f"give one input per modality, 1 to {MAX_MODALITIES} of them")
            if any(not key for key in value):
                raise ValueError("a modality name is empty")
        items = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else value
        if not items or len(items) > MAX_FRAMES:
            raise ValueError(f"give one input, or a list of 1 to {MAX_FRAMES} inputs (one per time step)")
        if any(not item for item in items):
            raise ValueError("an input is empty")
        return value

    @property
    def items(self) -> list[str]:
        """The request's inputs: one, one per time step, or one per modality."""
        if isinstance(self.data, dict):
            return list(self.data.values())
        return [self.data] if isinstance(self.data, str) else list(self.data)

    @property
    def modalities(self) -> dict[str, str] | None:
        """The inputs by modality, for a request that names them."""
        return dict(self.data) if isinstance(self.data, dict) else None

    @field_validator("image_format")
    @classmethod
    def _tiff_only(cls, value: str) -> str:
        if value.strip().lower() not in IMAGE_FORMATS:
            accepted = ", ".join(repr(name) for name in IMAGE_FORMATS)
            raise ValueError(f"{value!r} is not a TIFF format; inputs are read as GeoTIFF (accepted, in any case: {accepted})")
        return value

    @field_validator("indices")
    @classmethod
    def _indices_non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError("indices must be a non-empty list of band indices >= 0")
        return value


class PredictionOutput(BaseModel):
    """`response["data"]`: `data` is the output path or the base64 GeoTIFF (or the JSON result)."""

    data_format: str
    data: Any
    request_id: str | None = None
    timings: dict[str, float] | None = None
    """Seconds spent reading + decoding + tiling, in the engine (queue included), and stitching + encoding."""

    # vLLM's example processor `prithvi_to_tiff` answers `{type, format, data}` (ImageRequestOutput);
    # vLLM's tests and clients written for it read those names, so they are derived here too.
    @computed_field  # type: ignore[prop-decorator]
    @property
    def type(self) -> str:
        """Same as `data_format`."""
        return self.data_format

    @computed_field  # type: ignore[prop-decorator]
    @property
    def format(self) -> str:
        """"tiff" for GeoTIFF results, "json" for JSON ones."""
        return "json" if self.data_format == "json" else "tiff"


def parse_request(data: Any) -> GeoTiffRequest:
    """Validate `request["data"]`; every problem named, in one 400 message."""
    if isinstance(data, GeoTiffRequest):
        return data
    if hasattr(data, "data") and not isinstance(data, dict):  # an IOProcessorRequest
        data = data.data
    if not isinstance(data, dict):
        raise RequestError(
            f"request 'data' must be an object with data, data_format, out_data_format, image_format; got {type(data).__name__}"
        )
    ignored = sorted(str(key) for key in data if key not in GeoTiffRequest.model_fields)
    if ignored:
        logger.debug("vllm-terratorch: request fields %s are not used by this IO processor; ignored", ignored)
    try:
        return GeoTiffRequest.model_validate(data)
    except ValidationError as error:
        raise RequestError(f"invalid request: {describe_validation_error(error, 'data')}") from None
