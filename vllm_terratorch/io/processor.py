"""IO processors for `/pooling`: GeoTIFF in -> tiles through the engine -> georeferenced output.

One base class does the shared work (fetch within policy, decode, normalise like the datamodule,
tile with overlap, derive coordinates, stitch); each task subclass only turns the stitched model
output into its result (class mask GeoTIFF, value GeoTIFF, class probabilities).

All tiles of a request are returned as separate prompts, so vLLM batches them (with other
requests' tiles). Per-request state between pre- and post-processing lives in a bounded table
keyed by request id, removed when the request finishes, so failed requests cannot pile it up.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams

from vllm_terratorch.engine.compat import preprocess_off_the_event_loop
from vllm_terratorch.log import logger
from vllm_terratorch.core.config import pretrained_cfg_of
from vllm_terratorch.errors import ConfigError, RequestError
from vllm_terratorch.io.coords import acquisition_date, centre_lat_lon, year_and_day
from vllm_terratorch.io.geotiff import Raster, RasterHeader, RasterLimits, encode_geotiff, read_geotiff
from vllm_terratorch.io.outputs import OutputPolicy, OutputTarget
from vllm_terratorch.io.preprocessing import Preprocessing, preprocessing_from_config
from vllm_terratorch.io.schema import GeoTiffRequest, PredictionOutput, parse_request
from vllm_terratorch.io.settings import IOSettings, load_io_settings
from vllm_terratorch.io.sources import SourcePolicy
from vllm_terratorch.io.tiling import TilePlan, extract_tiles, plan_tiles, stitch, tiling_from_config

OFFLINE_KEY = "offline"
# Requests whose outputs never came back (engine error, client gone) are dropped after this long.
PENDING_TTL_S = 3600.0
PENDING_MAX = 4096


@dataclass(frozen=True)
class Pending:
    """What post-processing needs to know about a request it did not see."""

    request: GeoTiffRequest
    plan: TilePlan
    georef: Raster  # array holds only the nodata mask (1, H, W), not the pixels
    created: float  # time.monotonic() when pre-processing finished
    decode_s: float = 0.0
    output: OutputTarget | None = None  # where a `path` output goes, checked before the model ran


class GeoTiffProcessor(IOProcessor):
    """Shared pipeline; subclasses implement `render`."""

    task: ClassVar[str] = "segmentation"
    writes_raster: ClassVar[bool] = True  # False: the result is JSON, never a file

    def __init__(self, vllm_config: Any, renderer: Any = None) -> None:
        super().__init__(vllm_config, renderer)
        model_config = vllm_config.model_config
        self.pretrained_cfg = pretrained_cfg_of(model_config.hf_config, model_config.model)
        self.dtype: torch.dtype = model_config.dtype
        self.settings: IOSettings = load_io_settings()
        self.policy = SourcePolicy(
            self.settings,
            getattr(model_config, "allowed_local_media_path", None),
            getattr(model_config, "allowed_media_domains", None),
        )
        spec = self.pretrained_cfg.input
        self.image_name = spec.image_input
        image_shape = spec.data[self.image_name].shape
        self.model_bands = int(image_shape[0])
        self.limits = RasterLimits(self.settings.max_pixels, self.settings.max_raster_bytes)
        self.outputs = OutputPolicy([self.settings.output_path, *self.settings.allowed_output_paths])
        self._model_order_logged = False
        self.preprocessing: Preprocessing = preprocessing_from_config(self.pretrained_cfg.data, image_shape[0])
        init_args = self.pretrained_cfg.model.init_args
        self.tiling = tiling_from_config(init_args.get("tiled_inference_parameters"), (image_shape[-2], image_shape[-1]))
        self.extra_inputs = [name for name in spec.data if name != self.image_name]
        unsupported = [name for name in self.extra_inputs if name not in ("location_coords", "temporal_coords")]
        if unsupported:
            raise ConfigError(
                f"the {self.task} IO processor can derive an image, location_coords and temporal_coords from a GeoTIFF, "
                f"but this model also takes {unsupported}; use the offline API to pass them"
            )
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        self._lock = threading.Lock()
        # Downloads, decoding, tiling, stitching and encoding run here, never on vLLM's event loop.
        self.io_executor = ThreadPoolExecutor(self.settings.io_workers, thread_name_prefix="vllm-terratorch-io")
        preprocess_off_the_event_loop()
        logger.info(
            "vllm-terratorch: %s IO processor: tiles %dx%d stride %dx%d, outputs under %s",
            self.task, self.tiling.h_crop, self.tiling.w_crop, self.tiling.h_stride, self.tiling.w_stride,
            self.settings.output_path,
        )

    # vLLM interface -------------------------------------------------------------------------

    def parse_data(self, data: object) -> GeoTiffRequest:
        return parse_request(data)

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        params = params or PoolingParams(task="plugin")
        if params.task is None:
            params.task = "plugin"
        return params

    def pre_process(self, prompt: Any, request_id: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        started = time.monotonic()
        request = parse_request(prompt)
        output = self._output_target(request, request_id)
        data = self.policy.read(request.data, request.data_format)
        return self.prepare(data, request, request_id or OFFLINE_KEY, started, output)

    async def pre_process_async(self, prompt: Any, request_id: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io_executor, functools.partial(self.pre_process, prompt, request_id, **kwargs))

    async def post_process_async(
        self, model_output: AsyncGenerator[tuple[int, Any]], request_id: str | None = None, **kwargs: Any
    ) -> PredictionOutput:
        outputs = [output for _, output in sorted([item async for item in model_output], key=lambda item: item[0])]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io_executor, functools.partial(self.post_process, outputs, request_id, **kwargs))

    def post_process(self, model_output: Sequence[Any], request_id: str | None = None, **kwargs: Any) -> PredictionOutput:
        started = time.monotonic()
        key = request_id or OFFLINE_KEY
        with self._lock:
            pending = self._pending.get(key)
        result = self.complete([output.outputs.data for output in model_output], key)
        assert pending is not None  # complete() raised otherwise
        request = pending.request
        if isinstance(result, dict):
            data_format, data = "json", result
        elif request.out_data_format == "b64_json":
            data_format, data = "b64_json", base64.b64encode(result).decode("ascii")
        else:
            output = pending.output or self._output_target(request, request_id)
            assert output is not None  # out_data_format is "path"
            data_format, data = "path", str(self.outputs.write(output, result))
        timings = {
            "decode_s": round(pending.decode_s, 6),
            "engine_s": round(started - pending.created, 6),
            "encode_s": round(time.monotonic() - started, 6),
        }
        return PredictionOutput(data_format=data_format, data=data, request_id=request_id, timings=timings)

    # Reusable halves (also used by `vllm-terratorch predict`, which reads files itself) -----

    def prepare(
        self,
        data: bytes,
        request: GeoTiffRequest,
        key: str,
        started: float | None = None,
        output: OutputTarget | None = None,
    ) -> list[dict[str, Any]]:
        """GeoTIFF bytes -> one engine prompt per tile; remembers what `complete(key)` needs."""
        started = time.monotonic() if started is None else started
        raster = read_geotiff(data, self.limits, lambda header: self._check_header(header, request))
        image, nodata_mask = self._prepare(raster, request)
        plan = plan_tiles(raster.height, raster.width, self.tiling)
        tiles = torch.from_numpy(extract_tiles(image, plan)).to(self.dtype)
        extras = self._extra_inputs(raster, request)
        georef = Raster(array=nodata_mask, crs=raster.crs, transform=raster.transform, nodata=raster.nodata, tags=raster.tags)
        now = time.monotonic()
        self._remember(key, Pending(request, plan, georef, now, now - started, output))
        return [
            {"prompt_token_ids": [1], "multi_modal_data": {"image": {self.image_name: tile, **extras}}}
            for tile in tiles
        ]

    def take_pending(self, key: str) -> Pending | None:
        """Remove and return what `prepare(key)` remembered (to complete it in another process)."""
        with self._lock:
            return self._pending.pop(key, None)

    def remember(self, key: str, pending: Pending) -> None:
        """Hand back a `Pending` taken elsewhere, so that `complete(key)` can finish it here."""
        self._remember(key, pending)

    def complete(self, outputs: list[torch.Tensor], key: str) -> bytes | dict[str, Any]:
        """The tile outputs of request `key` -> its result (GeoTIFF bytes, or a JSON-able dict)."""
        pending = self.take_pending(key)
        if pending is None:
            raise RequestError(f"no pre-processed request {key!r} (it expired or was already answered)")
        if len(outputs) != len(pending.plan):
            raise RequestError(f"expected {len(pending.plan)} tile outputs, got {len(outputs)}")
        if not all(bool(torch.isfinite(output).all()) for output in outputs):
            raise RequestError(
                "the model produced no valid output for this image (NaN or infinite values; the "
                "server log says why); other requests are not affected"
            )
        return self.render(outputs, pending)

    # Pipeline steps -------------------------------------------------------------------------

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

    def _extra_inputs(self, raster: Raster, request: GeoTiffRequest) -> dict[str, torch.Tensor]:
        extras: dict[str, torch.Tensor] = {}
        if "temporal_coords" in self.extra_inputs:
            name = request.data if request.data_format != "b64_json" else None
            when = acquisition_date(raster.tags, name)
            if when is None:
                raise RequestError(
                    "the model takes temporal_coords, but the GeoTIFF has no TIFFTAG_DATETIME tag and its "
                    "name has no date (e.g. scene_2024-10-26.tif)"
                )
            shape = self.pretrained_cfg.input.data["temporal_coords"].shape
            extras["temporal_coords"] = torch.tensor(year_and_day(when), dtype=self.dtype).reshape(shape)
        if "location_coords" in self.extra_inputs:
            lat_lon = centre_lat_lon(raster)
            if lat_lon is None:
                raise RequestError("the model takes location_coords, but the GeoTIFF has no usable CRS/transform")
            shape = self.pretrained_cfg.input.data["location_coords"].shape
            extras["location_coords"] = torch.tensor(lat_lon, dtype=self.dtype).reshape(shape)
        return extras

    def _remember(self, key: str, pending: Pending) -> None:
        with self._lock:
            now = time.monotonic()
            while self._pending and (
                len(self._pending) >= PENDING_MAX or now - next(iter(self._pending.values())).created > PENDING_TTL_S
            ):
                self._pending.popitem(last=False)
            self._pending[key] = pending

    def _output_target(self, request: GeoTiffRequest, request_id: str | None) -> OutputTarget | None:
        """Where a `path` output will go, checked now so a bad `out_path` costs no model time."""
        if request.out_path is not None and request.out_data_format != "path":
            raise RequestError("out_path is only used with out_data_format 'path'")
        if request.out_data_format != "path" or not self.writes_raster:
            return None
        return self.outputs.target(request.out_path, request_id)

    def render(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        raise NotImplementedError


class SegmentationProcessor(GeoTiffProcessor):
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
        mask[pending.georef.array] = self.NODATA
        return encode_geotiff(mask, pending.georef, nodata=self.NODATA)


class RegressionProcessor(GeoTiffProcessor):
    """Per-pixel values (float32 GeoTIFF); input nodata pixels are NaN, the output's nodata value."""

    task = "regression"

    def render(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        values = stitch(outputs, pending.plan).astype(np.float32)
        values[np.broadcast_to(pending.georef.array, values.shape)] = np.nan
        return encode_geotiff(values, pending.georef, nodata=float("nan"))


class ClassificationProcessor(GeoTiffProcessor):
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
