"""The GeoTIFF pipeline, free of vLLM: request bytes -> model-ready tiles (+ the state to finish with),
tile outputs (+ that state) -> the answer (mask / values GeoTIFF, or class probabilities).

The IO-processor plugins (processor.py) are thin adapters around it for `/pooling`, and
`vllm-terratorch predict` runs it directly in its worker processes, so a file's prediction is the
server's answer for that file. Shared work here: fetch within policy, decode, normalise like the
datamodule, tile with overlap, derive coordinates, stitch; each task subclass (tasks.py) only turns
the stitched model output into its result.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vllm_terratorch.core.config import COORDINATE_INPUTS, PretrainedCfg, load_config
from vllm_terratorch.core.inputs import tile_prompts
from vllm_terratorch.errors import ConfigError, RequestError
from vllm_terratorch.io.coords import acquisition_date, centre_lat_lon, year_and_day
from vllm_terratorch.io.geotiff import (
    Georef, Grid, Raster, RasterLimits, check_one_grid, encode_geotiff, nodata_mask, read_geotiff,
)
from vllm_terratorch.io.outputs import OutputPolicy, OutputTarget
from vllm_terratorch.io.datamodule import DatamoduleInputs, takes_predict_folder
from vllm_terratorch.io.preprocessing import Preprocessing, fast_path_covers, preprocessing_from_config
from vllm_terratorch.io.schema import GeoTiffRequest, PredictionOutput
from vllm_terratorch.io.settings import IOSettings, load_io_settings
from vllm_terratorch.io.sources import SourcePolicy
from vllm_terratorch.io.tiling import TilePlan, cut_tiles, plan_tiles, stitch, tiling_from_config
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
    output_nodata: ClassVar[float | None] = None  # the output raster's nodata value

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
        self.image_names = spec.image_inputs
        if not self.image_names:
            raise ConfigError(f"pretrained_cfg.input: no input of rank >= 3 ({list(spec.data)}) is an image; set input.target")
        self.image_name = self.image_names[0]
        # Several image inputs: a multi-modal model (TerraMind), one GeoTIFF per modality per request.
        self.modalities = self.image_names if len(self.image_names) > 1 else None
        image_shape = spec.data[self.image_name].shape
        self.model_bands = int(image_shape[0])
        # A (C, T, H, W) image input: a multi-temporal model, T frames (time steps) per request.
        self.frames = int(image_shape[1]) if len(image_shape) == 4 and self.modalities is None else None
        self.limits = RasterLimits(self.settings.max_pixels, self.settings.max_raster_bytes)
        self.outputs = OutputPolicy([self.settings.output_path, *self.settings.allowed_output_paths])
        self._model_order_logged = False
        self.extra_inputs = [name for name in spec.data if name not in self.image_names]
        unsupported = [name for name in self.extra_inputs if name not in COORDINATE_INPUTS]
        if unsupported or (self.modalities and self.extra_inputs):
            raise ConfigError(
                f"the {self.task} IO processor can derive the image(s), location_coords and temporal_coords (one-image "
                f"models) from GeoTIFFs, but this model also takes {unsupported or self.extra_inputs}; use the offline "
                "API to pass them"
            )
        sizes = {name: tuple(spec.data[name].shape[-2:]) for name in self.image_names}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"pretrained_cfg.input: the image inputs differ in size {sizes}; they are tiled together")
        # The hand-written datamodule pipeline where it covers the config, else the datamodule itself;
        # a time-series model whose datamodule expands one stacked file also takes that file, through it.
        data = pretrained_cfg.data
        self.fast = self.modalities is None and fast_path_covers(data)
        stacked = self.frames is not None and bool(((data or {}).get("init_args") or {}).get("expand_temporal_dimension"))
        self.datamodule: DatamoduleInputs | None = None
        self.preprocessing = Preprocessing(masks_nodata=False)
        if self.fast:
            self.preprocessing = preprocessing_from_config(data, image_shape[0])
        if self.fast and stacked and takes_predict_folder(data):
            try:  # optional here: frames sent as a list take the fast path whatever happens
                self.datamodule = DatamoduleInputs(data or {}, self.image_names)
            except ConfigError as error:
                logger.warning("vllm-terratorch: one stacked time-series file per request cannot be read: %s", error)
        elif not self.fast and takes_predict_folder(data):
            self.datamodule = DatamoduleInputs(data or {}, self.image_names)
        elif not self.fast:
            if self.modalities is None:
                preprocessing_from_config(data, image_shape[0])  # raises, saying what it cannot reproduce
            raise ConfigError(
                f"the model's inputs ({', '.join(self.image_names)}) must be read through its datamodule, and "
                "pretrained_cfg.data names none that reads a folder (predict_data_root), e.g. "
                "terratorch.datamodules.GenericMultiModalDataModule"
            )
        init_args = pretrained_cfg.model.init_args
        self.tiling = tiling_from_config(init_args.get("tiled_inference_parameters"), (image_shape[-2], image_shape[-1]))

    @classmethod
    def for_model_folder(cls, model_dir: str | Path, dtype: torch.dtype, settings: IOSettings | None = None) -> GeoTiffPipeline:
        """The pipeline of a local model folder (what `predict` uses: no engine, no vLLM config)."""
        return cls(load_config(Path(model_dir)).pretrained_cfg, dtype, settings)

    def describe(self) -> str:
        c = self.tiling
        inputs = f"modalities {', '.join(self.modalities)}, " if self.modalities else ""
        reader = f"read by {self.datamodule.describe()}, " if self.datamodule is not None else ""
        return (f"{self.task} IO processor: {inputs}{reader}tiles {c.h_crop}x{c.w_crop} stride {c.h_stride}x{c.w_stride}, "
                f"outputs under {self.settings.output_path}")

    # A request, start to finish ------------------------------------------------------------

    def read(self, request: GeoTiffRequest) -> list[bytes]:
        """The bytes of each of the request's GeoTIFFs (inline, a path or a URL, within the server's
        policy): one, one per frame in time order, or one per modality in the model's order."""
        self.check_request(request)
        if self.modalities is not None and request.modalities is None:  # a folder of modality folders
            return self.policy.read_modality_folder(request.items[0], self.modalities)
        items = request.items if request.modalities is None else [request.modalities[name] for name in self.modalities]
        return [self.policy.read(item, request.data_format) for item in items]

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
        self.check_request(request)
        files = [data] if isinstance(data, bytes) else list(data)
        check = None if self.reads_by_datamodule(request) else (lambda header: self.band_layout(header.bands, request))
        rasters = [read_geotiff(item, self.limits, check) for item in files]
        check_one_grid(rasters, self.modalities)
        images, masks = self._images(files, rasters, request)
        raster = rasters[0]
        nodata_mask = np.logical_or.reduce(masks)
        plan = plan_tiles(raster.height, raster.width, self.tiling)
        tiles = {name: cut_tiles(image, plan).to(self.dtype) for name, image in images.items()}
        extras = self.coordinates(rasters, request)
        now = time.monotonic()
        pending = Pending(request, plan, raster.georef, nodata_mask, now, now - started, output)
        prompts = tile_prompts(tiles, extras)
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

    def check_request(self, request: GeoTiffRequest) -> None:
        """The request's shape must be the model's: one image, T frames, or one per modality."""
        if self.modalities is not None:
            self._check_modalities(request)
            return
        if request.modalities is not None:
            raise RequestError(
                f"this model takes one image per request, not one per modality; got an object with {sorted(request.modalities)}"
            )
        if self.reads_by_datamodule(request) and request.indices is not None:
            assert self.datamodule is not None
            raise RequestError(
                f"this model's inputs are read by its datamodule ({self.datamodule.name}), which selects the bands "
                "itself; 'indices' cannot be applied, send the file in the datamodule's band layout"
            )
        count = len(request.items)
        if self.reads_by_datamodule(request):  # one file, read as the datamodule reads it (a stacked time series included)
            assert self.datamodule is not None
            if count != 1:
                raise RequestError(
                    f"this model's inputs are read by its datamodule ({self.datamodule.name}), one file per request "
                    f"(with expand_temporal_dimension, one file holding every time step); got {count}"
                )
            steps = self.frames or 1
            if request.dates is not None and len(request.dates) != steps:
                raise RequestError(f"'dates' has {len(request.dates)} dates for {steps} time step(s); give one per step")
            return
        if self.frames is None and count != 1:
            raise RequestError(f"this model takes one image per request (no time dimension); got a list of {count}")
        if self.frames is not None and count != self.frames:
            raise RequestError(
                f"this model takes {self.frames} frames (time steps) per request: send 'data' as a list of "
                f"{self.frames} inputs in time order; got {count}"
            )
        if request.dates is not None and len(request.dates) != count:
            raise RequestError(f"'dates' has {len(request.dates)} dates for {count} input(s); give one per input")

    def reads_by_datamodule(self, request: GeoTiffRequest) -> bool:
        """Whether this request is read by running the model's datamodule (else by the fast path)."""
        if not self.fast:
            return True
        return self.datamodule is not None and self.frames is not None and len(request.items) == 1

    def _check_modalities(self, request: GeoTiffRequest) -> None:
        assert self.modalities is not None
        expected = ", ".join(self.modalities)
        given = request.modalities
        if given is None:
            if request.data_format != "path" or not isinstance(request.data, str):
                raise RequestError(
                    f"this multi-modal model takes one input per modality: send 'data' as an object "
                    f'{{"{self.modalities[0]}": ..., ...}} with {expected} (or, with data_format "path", a folder '
                    "holding one sub-folder per modality)"
                )
            return
        missing = [name for name in self.modalities if name not in given]
        unknown = [name for name in given if name not in self.modalities]
        if missing or unknown:
            problems = [f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else ""]
            raise RequestError(
                f"this model takes the modalities {expected}, one input each; {' and '.join(p for p in problems if p)}"
            )
        if request.dates is not None:
            raise RequestError("'dates' is for time series (a list of inputs); this multi-modal model takes no dates")

    def band_layout(self, file_bands: int, request: GeoTiffRequest) -> Preprocessing:
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

    def _images(
        self, files: list[bytes], rasters: list[Raster], request: GeoTiffRequest,
    ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """The model-ready image of each image input, and each file's nodata mask (1, H, W)."""
        if not self.reads_by_datamodule(request):
            prepared = [self.prepare_pixels(raster.array, raster.nodata, request) for raster in rasters]
            images = [image for image, _ in prepared]
            # A time series: (C, T, H, W), the frames in time order.
            image = images[0] if self.frames is None else np.stack(images, axis=1)
            return {self.image_name: image}, [mask for _, mask in prepared]
        assert self.datamodule is not None
        names = self.modalities or [self.image_name]
        hint = "bands per input: " + ", ".join(f"{name} {raster.array.shape[0]}" for name, raster in zip(names, rasters)) + (
            "; the model takes " + ", ".join(f"{name} {self.pretrained_cfg.input.data[name].shape[0]}" for name in names))
        images = self.datamodule.run(dict(zip(names, files, strict=True)), hint)
        raster = rasters[0]
        for name, image in images.items():
            expected = self.pretrained_cfg.input.data[name].shape[:-2]
            if list(image.shape[:-2]) != expected:
                raise RequestError(
                    f"the model's datamodule read the input {name} as {list(image.shape[:-2])} (bands[, time steps]); "
                    f"the model takes {expected}: check the file's band count"
                )
            if image.shape[-2:] != (raster.height, raster.width):
                raise RequestError(
                    f"the model's datamodule turned the {raster.height}x{raster.width} input {name} into "
                    f"{image.shape[-2]}x{image.shape[-1]} (a resizing or cropping transform), which cannot be "
                    "georeferenced; serve a config whose predict transforms keep the image size"
                )
        return images, [nodata_mask(raster.array, raster.nodata) for raster in rasters]

    def prepare_pixels(self, array: np.ndarray, nodata: float | None, request: GeoTiffRequest) -> tuple[np.ndarray, np.ndarray]:
        """Model-ready float32 pixels (C, h, w) and their nodata mask (1, h, w), from a file's raw
        pixels: a whole raster, or a window of one (pixel by pixel, so a window's values are the
        whole raster's values there)."""
        preprocessing = self.band_layout(array.shape[0], request)
        if request.indices is not None:
            array = array[request.indices]
        mask = nodata_mask(array, nodata)
        image = preprocessing.apply(array, nodata=nodata)
        if not np.isfinite(image).all():
            raise RequestError(
                "the image has NaN or infinite pixel values that the model's datamodule does not replace "
                "(set nodata on the GeoTIFF, or no_data_replace in the config's data section)"
            )
        return image, mask

    def coordinates(self, rasters: Sequence[Grid], request: GeoTiffRequest) -> dict[str, torch.Tensor]:
        """temporal_coords (one (year, day) per frame) and location_coords (the first frame's centre)."""
        extras: dict[str, torch.Tensor] = {}
        if "temporal_coords" in self.extra_inputs:
            if self.frames is not None and len(rasters) == 1 and self.frames > 1:  # one stacked file
                if request.dates is None:
                    raise RequestError(
                        f"the model takes temporal_coords, and one file holds all {self.frames} time steps (one date "
                        f"tag at most): give 'dates', one ISO date per time step ({self.frames})"
                    )
                dates = list(request.dates)
            else:
                names = request.items if request.data_format != "b64_json" else [None] * len(rasters)
                dates = [self._frame_date(index, raster, name, request)
                         for index, (raster, name) in enumerate(zip(rasters, names, strict=True))]
            days = [year_and_day(when) for when in dates]
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
    def _frame_date(index: int, raster: Grid, name: str | None, request: GeoTiffRequest) -> date:
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

    def raster_rows(self, stitched: np.ndarray, nodata_mask: np.ndarray) -> np.ndarray:
        """Stitched output (K, h, W) and the inputs' nodata mask (1, h, W) -> the output raster's rows
        (pixel by pixel: a scene streamed in row bands, windows.py, gets the whole one's values)."""
        raise NotImplementedError(f"the {self.task} IO processor writes no raster")

    def render(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        """The result of a request held whole (raster tasks: its GeoTIFF; others override this)."""
        values = self.raster_rows(stitch(outputs, pending.plan), pending.nodata_mask)
        return encode_geotiff(values, pending.georef, nodata=self.output_nodata)
