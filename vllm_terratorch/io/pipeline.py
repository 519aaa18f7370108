"""The GeoTIFF pipeline, free of vLLM: request bytes -> model-ready tiles (+ the state to finish with),
tile outputs (+ that state) -> the answer (mask / values GeoTIFF, or class probabilities).

The IO-processor plugins (processor.py) are thin adapters around it for `/pooling`, and
`vllm-terratorch predict` runs it directly in its worker processes, so a file's prediction is the
server's answer for that file. Shared work here: fetch within policy, decode, normalise like the
datamodule, tile with overlap, derive coordinates, stitch; each task subclass only turns the
stitched model output into its result.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vllm_terratorch.core.config import COORDINATE_INPUTS, PretrainedCfg, load_config
from vllm_terratorch.core.inputs import tensor_prompt
from vllm_terratorch.errors import ConfigError, RequestError
from vllm_terratorch.io.coords import acquisition_date, centre_lat_lon, year_and_day
from vllm_terratorch.io.geotiff import Georef, Raster, RasterHeader, RasterLimits, encode_geotiff, read_geotiff
from vllm_terratorch.io.outputs import OutputPolicy, OutputTarget
from vllm_terratorch.io.preprocessing import Preprocessing, preprocessing_from_config
from vllm_terratorch.io.schema import GeoTiffRequest, PredictionOutput
from vllm_terratorch.io.settings import IOSettings, load_io_settings
from vllm_terratorch.io.sources import SourcePolicy
from vllm_terratorch.io.tiling import TilePlan, extract_tiles, plan_tiles, stitch, tiling_from_config
from vllm_terratorch.log import logger


@dataclass(frozen=True)
class Pending:
    """What finishing a request needs from its preparation (picklable: predict ships it between processes)."""

    request: GeoTiffRequest
    plan: TilePlan
    georef: Georef
    nodata_mask: np.ndarray  # (1, H, W): input pixels that were nodata
    created: float  # time.monotonic() when preparation finished
    decode_s: float = 0.0
    output: OutputTarget | None = None  # where a `path` output goes, checked before the model ran


class GeoTiffPipeline:
    """Shared pipeline; subclasses implement `render`."""

    task: ClassVar[str] = "segmentation"
    writes_raster: ClassVar[bool] = True  # False: the result is JSON, never a file

    def __init__(
        self,
        pretrained_cfg: PretrainedCfg,
        dtype: torch.dtype,
        settings: IOSettings | None = None,
        allowed_local_media_path: str | None = None,
        allowed_media_domains: list[str] | None = None,
    ) -> None:
        self.pretrained_cfg = pretrained_cfg
        self.dtype = dtype
        self.settings = settings if settings is not None else load_io_settings()
        self.policy = SourcePolicy(self.settings, allowed_local_media_path, allowed_media_domains)
        spec = pretrained_cfg.input
        self.image_name = spec.image_input
        image_shape = spec.data[self.image_name].shape
        self.model_bands = int(image_shape[0])
        # A (C, T, H, W) image input: a multi-temporal model, T frames (time steps) per request.
        self.frames = int(image_shape[1]) if len(image_shape) == 4 else None
        self.limits = RasterLimits(self.settings.max_pixels, self.settings.max_raster_bytes)
        self.outputs = OutputPolicy([self.settings.output_path, *self.settings.allowed_output_paths])
        self._model_order_logged = False
        self.preprocessing: Preprocessing = preprocessing_from_config(pretrained_cfg.data, image_shape[0])
        init_args = pretrained_cfg.model.init_args
        self.tiling = tiling_from_config(init_args.get("tiled_inference_parameters"), (image_shape[-2], image_shape[-1]))
        self.extra_inputs = [name for name in spec.data if name != self.image_name]
        unsupported = [name for name in self.extra_inputs if name not in COORDINATE_INPUTS]
        if unsupported:
            raise ConfigError(
                f"the {self.task} IO processor can derive an image, location_coords and temporal_coords from a GeoTIFF, "
                f"but this model also takes {unsupported}; use the offline API to pass them"
            )

    @classmethod
    def for_model_folder(cls, model_dir: str | Path, dtype: torch.dtype, settings: IOSettings | None = None) -> GeoTiffPipeline:
        """The pipeline of a local model folder (what `predict` uses: no engine, no vLLM config)."""
        return cls(load_config(Path(model_dir)).pretrained_cfg, dtype, settings)

    def describe(self) -> str:
        c = self.tiling
        return (f"{self.task} IO processor: tiles {c.h_crop}x{c.w_crop} stride {c.h_stride}x{c.w_stride}, "
                f"outputs under {self.settings.output_path}")

    # A request, start to finish ------------------------------------------------------------

    def read(self, request: GeoTiffRequest) -> list[bytes]:
        """The bytes of each of the request's GeoTIFFs (inline, a path or a URL, within the server's policy)."""
        self._check_frame_count(request)
        return [self.policy.read(item, request.data_format) for item in request.items]

    def output_target(self, request: GeoTiffRequest, request_id: str | None) -> OutputTarget | None:
        """Where a `path` output will go, checked now so a bad `out_path` costs no model time."""
        if request.out_path is not None and request.out_data_format != "path":
            raise RequestError("out_path is only used with out_data_format 'path'")
        if request.out_data_format != "path" or not self.writes_raster:
            return None
        return self.outputs.target(request.out_path, request_id)

    def prepare(
        self, data: bytes | list[bytes], request: GeoTiffRequest, started: float | None = None,
        output: OutputTarget | None = None,
    ) -> tuple[list[dict[str, Any]], Pending]:
        """GeoTIFF bytes (one file, or one per frame) -> one engine prompt per tile, and what
        `complete` needs to finish. Every frame is cut at the same windows."""
        started = time.monotonic() if started is None else started
        self._check_frame_count(request)
        files = [data] if isinstance(data, bytes) else data
        rasters = [read_geotiff(item, self.limits, lambda header: self._check_header(header, request)) for item in files]
        _check_one_grid(rasters)
        prepared = [self._prepare(raster, request) for raster in rasters]
        raster = rasters[0]
        nodata_mask = np.logical_or.reduce([mask for _, mask in prepared])
        plan = plan_tiles(raster.height, raster.width, self.tiling)
        if self.frames is None:
            tiles = torch.from_numpy(extract_tiles(prepared[0][0], plan))
        else:  # (C, T, H, W): frames side by side as channels, cut once, put back
            image = np.stack([image for image, _ in prepared], axis=1)
            channels, frames = image.shape[:2]
            flat = extract_tiles(image.reshape(channels * frames, *image.shape[2:]), plan)
            tiles = torch.from_numpy(flat.reshape(len(flat), channels, frames, *flat.shape[2:]))
        tiles = tiles.to(self.dtype)
        extras = self._extra_inputs(rasters, request)
        now = time.monotonic()
        pending = Pending(request, plan, raster.georef, nodata_mask, now, now - started, output)
        prompts = [tensor_prompt({self.image_name: tile, **extras}) for tile in tiles]
        return prompts, pending

    def complete(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        """The tile outputs of a request -> its result (GeoTIFF bytes, or a JSON-able dict)."""
        if len(outputs) != len(pending.plan):
            raise RequestError(f"expected {len(pending.plan)} tile outputs, got {len(outputs)}")
        if not all(bool(torch.isfinite(output).all()) for output in outputs):
            raise RequestError(
                "the model produced no valid output for this image (NaN or infinite values; the "
                "server log says why); other requests are not affected"
            )
        return self.render(outputs, pending)

    def answer(self, result: bytes | dict[str, Any], pending: Pending, request_id: str | None, started: float) -> PredictionOutput:
        """The `/pooling` answer for a result: inline JSON or base64, or the path it was written to."""
        request = pending.request
        if isinstance(result, dict):
            data_format, data = "json", result
        elif request.out_data_format == "b64_json":
            data_format, data = "b64_json", base64.b64encode(result).decode("ascii")
        else:
            output = pending.output or self.output_target(request, request_id)
            assert output is not None  # out_data_format is "path"
            data_format, data = "path", str(self.outputs.write(output, result))
        timings = {
            "decode_s": round(pending.decode_s, 6),
            "engine_s": round(started - pending.created, 6),
            "encode_s": round(time.monotonic() - started, 6),
        }
        return PredictionOutput(data_format=data_format, data=data, request_id=request_id, timings=timings)

    @staticmethod
    def file_bytes(result: bytes | dict[str, Any]) -> bytes:
        """A result as the content of its output file (GeoTIFF bytes, or indented JSON)."""
        return (json.dumps(result, indent=2) + "\n").encode() if isinstance(result, dict) else result

    # Steps ----------------------------------------------------------------------------------

    def _check_frame_count(self, request: GeoTiffRequest) -> None:
        count = len(request.items)
        if self.frames is None and count != 1:
            raise RequestError(f"this model takes one image per request (no time dimension); got a list of {count}")
        if self.frames is not None and count != self.frames:
            raise RequestError(
                f"this model takes {self.frames} frames (time steps) per request: send 'data' as a list of "
                f"{self.frames} inputs in time order; got {count}"
            )
        if request.dates is not None and len(request.dates) != count:
            raise RequestError(f"'dates' has {len(request.dates)} dates for {count} input(s); give one per input")

    def _check_header(self, header: RasterHeader, request: GeoTiffRequest) -> None:
        """Refuse a band layout the model cannot take before any pixel is decoded."""
        self._band_layout(header.bands, request)

    def _band_layout(self, file_bands: int, request: GeoTiffRequest) -> Preprocessing:
        """The pipeline for this file: `indices` first, else by the file's band count."""
        if request.indices is not None:
            if len(request.indices) != self.model_bands:
                raise RequestError(f"indices selects {len(request.indices)} bands; the model takes {self.model_bands}")
            if max(request.indices) >= file_bands:
                raise RequestError(
                    f"indices {request.indices} name band {max(request.indices)}, but the GeoTIFF has {file_bands} bands"
                )
            return self.preprocessing.model_copy(update={"band_indices": None, "expected_file_bands": None})
        preprocessing = self.preprocessing.for_file_bands(file_bands, self.model_bands)
        if preprocessing is not self.preprocessing and not self._model_order_logged:
            self._model_order_logged = True
            logger.info(
                "vllm-terratorch: a GeoTIFF with %d bands (the model's input bands) is taken as already in model "
                "order; files with the datamodule's %s bands are selected by name, 'indices' picks any others",
                file_bands, self.preprocessing.expected_file_bands,
            )
        return preprocessing

    def _prepare(self, raster: Raster, request: GeoTiffRequest) -> tuple[np.ndarray, np.ndarray]:
        """Model-ready float32 image (C, H, W) and the input's nodata mask (1, H, W)."""
        array = raster.array
        preprocessing = self._band_layout(array.shape[0], request)
        if request.indices is not None:
            array = array[request.indices]
        invalid = ~np.isfinite(array) if np.issubdtype(array.dtype, np.floating) else np.zeros(array.shape, bool)
        if raster.nodata is not None and np.isfinite(raster.nodata):
            invalid |= array == raster.nodata
        mask = invalid.any(axis=0, keepdims=True)
        image = preprocessing.apply(array, nodata=raster.nodata)
        if not np.isfinite(image).all():
            raise RequestError(
                "the image has NaN or infinite pixel values that the model's datamodule does not replace "
                "(set nodata on the GeoTIFF, or no_data_replace in the config's data section)"
            )
        return image, mask

    def _extra_inputs(self, rasters: list[Raster], request: GeoTiffRequest) -> dict[str, torch.Tensor]:
        """temporal_coords (one (year, day) per frame) and location_coords (the first frame's centre)."""
        extras: dict[str, torch.Tensor] = {}
        if "temporal_coords" in self.extra_inputs:
            names = request.items if request.data_format != "b64_json" else [None] * len(rasters)
            days = [year_and_day(self._frame_date(index, raster, name, request)) for index, (raster, name)
                    in enumerate(zip(rasters, names, strict=True))]
            shape = self.pretrained_cfg.input.data["temporal_coords"].shape
            extras["temporal_coords"] = torch.tensor(days, dtype=self.dtype).reshape(shape)
        if "location_coords" in self.extra_inputs:
            lat_lon = centre_lat_lon(rasters[0])
            if lat_lon is None:
                raise RequestError("the model takes location_coords, but the GeoTIFF has no usable CRS/transform")
            shape = self.pretrained_cfg.input.data["location_coords"].shape
            extras["location_coords"] = torch.tensor(lat_lon, dtype=self.dtype).reshape(shape)
        return extras

    @staticmethod
    def _frame_date(index: int, raster: Raster, name: str | None, request: GeoTiffRequest) -> date:
        """The file's TIFFTAG_DATETIME, else a date in its name, else the request's `dates`."""
        when = acquisition_date(raster.tags, name)
        if when is None and request.dates is not None:
            when = request.dates[index]
        if when is None:
            which = "the GeoTIFF" if len(request.items) == 1 else f"input {index + 1} of {len(request.items)}"
            raise RequestError(
                f"the model takes temporal_coords, but {which} has no TIFFTAG_DATETIME tag and no date in its name "
                "(e.g. scene_2024-10-26.tif, HLS...2024300T184519); or give 'dates': one ISO date per input"
            )
        return when

    def render(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        raise NotImplementedError




class SegmentationPipeline(GeoTiffPipeline):
    """Class mask (uint8 GeoTIFF).

    `mask_encoding: "ids"` (default): class ids, input nodata pixels 255 (the output's nodata), so a
    multi-class mask keeps every class. `"terratorch"`: what TerraTorch's processor writes, the class
    id times 255 wrapped to uint8 with nodata 0 (class 0 then reads as nodata, and classes above 1
    collide), for clients that threshold at 255 or compare hashes of upstream's files.
    """

    task = "segmentation"
    NODATA = 255

    def render(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        logits = stitch(outputs, pending.plan)
        if logits.shape[0] >= self.NODATA:
            raise RequestError(f"the model predicts {logits.shape[0]} classes; a uint8 mask holds at most 254")
        classes = logits.argmax(axis=0)[None]
        if self.settings.mask_encoding == "terratorch":
            # TerraTorch: `(prediction.float().numpy() * 255.0).astype(np.uint8)`, meta nodata=0.
            mask = (classes.astype(np.float32) * np.float32(255.0)).astype(np.uint8)
            return encode_geotiff(mask, pending.georef, nodata=0)
        mask = classes.astype(np.uint8)
        mask[pending.nodata_mask] = self.NODATA
        return encode_geotiff(mask, pending.georef, nodata=self.NODATA)


class RegressionPipeline(GeoTiffPipeline):
    """Per-pixel values (float32 GeoTIFF); input nodata pixels are NaN, the output's nodata value."""

    task = "regression"

    def render(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        values = stitch(outputs, pending.plan).astype(np.float32)
        values[np.broadcast_to(pending.nodata_mask, values.shape)] = np.nan
        return encode_geotiff(values, pending.georef, nodata=float("nan"))


class ClassificationPipeline(GeoTiffPipeline):
    """Class probabilities of the whole image (JSON): tile logits averaged, then softmax."""

    task = "classification"
    writes_raster = False

    def render(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        logits = torch.stack([out.float().reshape(-1) for out in outputs]).mean(dim=0)
        probabilities = torch.softmax(logits, dim=0).tolist()
        names = (self.pretrained_cfg.data or {}).get("init_args", {}).get("class_names")
        result = {
            "predicted_class": int(np.argmax(probabilities)),
            "probabilities": probabilities,
            "tiles": len(outputs),
        }
        if isinstance(names, list) and len(names) == len(probabilities):
            result["class_names"] = names
        return result


def _check_one_grid(rasters: list[Raster]) -> None:
    """The frames of a time series must share one grid (they are stacked pixel by pixel)."""
    first = rasters[0]
    for index, raster in enumerate(rasters[1:], start=2):
        for what, mine, theirs in (("size", (raster.height, raster.width), (first.height, first.width)),
                                   ("CRS", raster.crs, first.crs), ("transform", raster.transform, first.transform)):
            if mine != theirs:
                raise RequestError(f"input {index} is not on input 1's grid: its {what} is {mine}, input 1's is {theirs}")


PIPELINES: dict[str, type[GeoTiffPipeline]] = {
    pipeline.task: pipeline for pipeline in (SegmentationPipeline, RegressionPipeline, ClassificationPipeline)
}
