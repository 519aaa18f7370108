"""Scenes larger than memory (issue #18): read tile by tile from the files on disk, blended a tile row
at a time, written window by window. Never the whole raster, in or out.

- `WindowedScene` opens a scene's file(s) (one GeoTIFF, or one per time step), checks them as a
  request's files are checked (band layout, one grid, dates), plans the tiles over the whole scene
  and cuts any run of them from windows of the files. Each window goes through the pipeline's own
  per-pixel steps (`prepare_pixels`) and is padded with the indices `extract_tiles` uses, so every
  tile is bit for bit the tile `prepare` cuts from the decoded raster.
- `SceneWriter` takes the tile outputs in plan order (`RowStitcher`), renders each finished band of
  rows with the task's `raster_rows` (the nodata mask read back from the files for those rows) and
  writes it (`GeoTiffRowWriter`): a tiled, compressed GeoTIFF under a temporary name, renamed when
  complete, or a Cloud-Optimized GeoTIFF made from it.

What is held at once: the tiles asked for, K x h_crop x width accumulators and one block row (256
rows) of output; not a function of the scene's height.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_terratorch.errors import RequestError
from vllm_terratorch.files import PartialFile, StagedFile
from vllm_terratorch.io.geotiff import Georef, RasterHeader, check_one_grid, nodata_mask
from vllm_terratorch.io.pipeline import GeoTiffPipeline
from vllm_terratorch.io.schema import GeoTiffRequest
from vllm_terratorch.io.tiling import RowStitcher, plan_indices, plan_tiles, take_padded


@dataclass(frozen=True)
class RasterFile:
    """An open GeoTIFF's grid, nodata value and tags (a `Grid`); its pixels stay in the file."""

    path: Path
    header: RasterHeader
    crs: Any
    transform: Any
    nodata: float | None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.header.height

    @property
    def width(self) -> int:
        return self.header.width

    @property
    def georef(self) -> Georef:
        return Georef(self.crs, self.transform, self.nodata, self.tags)


def _open(path: Path) -> tuple[Any, RasterFile]:
    import rasterio
    from rasterio.errors import RasterioError

    try:
        source = rasterio.open(path)
    except RasterioError as error:
        raise RequestError(f"the input is not a readable GeoTIFF: {error}") from None
    if source.driver != "GTiff":
        source.close()
        raise RequestError(f"{path.name} is a {source.driver} raster; expected a GeoTIFF")
    return source, RasterFile(path, RasterHeader.of(source), source.crs, source.transform, source.nodata, source.tags())


class WindowedScene:
    """A scene on disk, read by window: its tile plan, coordinates, and any run of its tiles."""

    @staticmethod
    def readable(pipeline: GeoTiffPipeline, request: GeoTiffRequest) -> bool:
        """Whether `request`'s inputs can be read by window: by the hand-written path (a datamodule reads
        whole files; so do multi-modal models, through theirs)."""
        return pipeline.modalities is None and not pipeline.reads_by_datamodule(request)

    @classmethod
    def supports(cls, pipeline: GeoTiffPipeline, request: GeoTiffRequest) -> bool:
        """Whether `request`'s scene can be streamed: read by window, and a raster output written as it goes."""
        return pipeline.writes_raster and cls.readable(pipeline, request)

    def __init__(self, pipeline: GeoTiffPipeline, request: GeoTiffRequest, paths: Sequence[Path]) -> None:
        pipeline.check_request(request)
        if not self.readable(pipeline, request):
            raise RequestError(
                "this model's inputs are read by its datamodule, which reads whole files: the scene cannot be "
                "read window by window (it is read whole, within the size limits)"
            )
        self.pipeline, self.request = pipeline, request
        self.sources: list[Any] = []
        self.files: list[RasterFile] = []
        try:
            for path in paths:
                source, file = _open(Path(path))
                self.sources.append(source)
                self.files.append(file)
                pipeline.limits.check_windowed(file.header)
                pipeline.band_layout(file.header.bands, request)
            check_one_grid(self.files, pipeline.modalities)
            first = self.files[0]
            self.plan = plan_tiles(first.height, first.width, pipeline.tiling)
            self.rows, self.cols = plan_indices(self.plan)
            self.extras = pipeline.coordinates(self.files, request)
        except BaseException:
            self.close()
            raise

    @property
    def pixels(self) -> int:
        return self.plan.height * self.plan.width

    @property
    def georef(self) -> Georef:
        return self.files[0].georef

    def close(self) -> None:
        for source in self.sources:
            source.close()
        self.sources = []

    def __enter__(self) -> WindowedScene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, index: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """File `index`'s raw pixels covering the image positions `rows` x `cols` (-1: padding), and
        the indices into that window."""
        from rasterio.windows import Window

        valid_rows, valid_cols = rows[rows >= 0], cols[cols >= 0]
        top, left = int(valid_rows.min()), int(valid_cols.min())
        window = Window(left, top, int(valid_cols.max()) + 1 - left, int(valid_rows.max()) + 1 - top)
        raw = self.sources[index].read(window=window)
        return raw, (np.where(rows < 0, -1, rows - top), np.where(cols < 0, -1, cols - left))

    def _band(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Model-ready, padded pixels at `rows` x `cols`: (C, h, w), or (C, T, h, w) for a time series."""
        images = []
        for index, file in enumerate(self.files):
            raw, (window_rows, window_cols) = self._read(index, rows, cols)
            image, _ = self.pipeline.prepare_pixels(raw, file.nodata, self.request)
            images.append(take_padded(image, window_rows, window_cols))
        return images[0] if self.pipeline.frames is None else np.stack(images, axis=1)

    def tiles(self, start: int, stop: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tiles `start` .. `stop - 1` of the plan, as `prepare` cuts them: {image input: (n, C[, T], h, w)}
        at the pipeline's dtype (or `dtype`). One window per file per tile row touched."""
        c = self.plan.config
        origins = self.plan.origins[start:stop]
        cut: list[np.ndarray] = []
        for top in sorted({top for top, _ in origins}):
            lefts = [left for row, left in origins if row == top]
            first = min(lefts)
            band = self._band(self.rows[top : top + c.h_crop], self.cols[first : max(lefts) + c.w_crop])
            cut.extend(band[..., left - first : left - first + c.w_crop] for left in lefts)
        return {self.pipeline.image_name: torch.from_numpy(np.stack(cut)).to(dtype or self.pipeline.dtype)}

    def nodata_rows(self, top: int, count: int) -> np.ndarray:
        """(1, count, W): pixels of rows `top` .. that are nodata in any input, as `prepare` masks them."""
        rows, cols = np.arange(top, top + count), np.arange(self.plan.width)
        masks = []
        for index, file in enumerate(self.files):
            raw, _ = self._read(index, rows, cols)
            if self.request.indices is not None:
                raw = raw[self.request.indices]
            masks.append(nodata_mask(raw, file.nodata))
        return np.logical_or.reduce(masks)


class GeoTiffRowWriter:
    """A GeoTIFF written top to bottom, one band of rows at a time, never held whole.

    Tiled (256 x 256) and LZW-compressed, BigTIFF when needed, georeferenced like the input; rows
    are buffered to whole block rows so every block is written once. It is written under a
    temporary name (`destination`: `files.PartialFile` for `predict`, `.NAME.*.partial` beside the
    target, what `predict` cleans up after a hard stop; the server's `StagedOutput`) and published
    at `close`: a crash or Ctrl-C never leaves a partial file under the final name. `cog`: the
    finished file is rewritten by GDAL's COG driver (overviews, COG tile order).
    """

    BLOCK = 256

    def __init__(self, destination: Path | StagedFile, height: int, width: int, georef: Georef, nodata: float | None,
                 *, cog: bool = False, resampling: str = "nearest") -> None:
        self.destination = PartialFile(destination) if isinstance(destination, Path) else destination
        self.height, self.width, self.georef, self.nodata = height, width, georef, nodata
        self.cog, self.resampling = cog, resampling
        self.temporary = self.destination.temporary
        self.target: Any = None
        self.written = 0  # rows on disk
        self.buffer: list[np.ndarray] = []

    def _open(self, first: np.ndarray) -> None:
        import rasterio

        profile = {
            "driver": "GTiff", "height": self.height, "width": self.width, "count": first.shape[0],
            "dtype": first.dtype.name, "crs": self.georef.crs, "transform": self.georef.transform,
            "compress": "lzw", "tiled": True, "blockxsize": self.BLOCK, "blockysize": self.BLOCK, "BIGTIFF": "IF_SAFER",
        }
        if self.nodata is not None:
            profile["nodata"] = self.nodata
        self.target = rasterio.open(self.temporary, "w", **profile)

    def write(self, rows: np.ndarray) -> None:
        """The next rows, (bands, n, W), top to bottom."""
        if self.target is None:
            self._open(rows)
        self.buffer.append(rows)
        buffered = sum(part.shape[1] for part in self.buffer)
        whole = buffered - buffered % self.BLOCK if self.written + buffered < self.height else buffered
        if whole:
            self._flush(whole)

    def _flush(self, count: int) -> None:
        from rasterio.windows import Window

        block = np.concatenate(self.buffer, axis=1)
        self.target.write(block[:, :count], window=Window(0, self.written, self.width, count))
        self.written += count
        self.buffer = [block[:, count:]] if count < block.shape[1] else []

    def close(self) -> Path:
        """Finish the file and give it its name (only once every row is written)."""
        received = self.written + sum(part.shape[1] for part in self.buffer)
        if received != self.height or self.target is None:
            self.abort()
            raise RequestError(f"the output got {received} of its {self.height} rows; nothing was written")
        self.target.close()
        if self.cog:
            from rasterio.shutil import copy

            cog = self.temporary.with_name(self.temporary.name + ".cog")
            try:
                copy(self.temporary, cog, driver="COG", compress="LZW", overview_resampling=self.resampling,
                     BIGTIFF="IF_SAFER")
                os.replace(cog, self.temporary)
            finally:
                cog.unlink(missing_ok=True)
        return self.destination.publish()

    def abort(self) -> None:
        if self.target is not None and not self.target.closed:
            self.target.close()
        self.destination.discard()


class SceneWriter:
    """A streamed scene's output: tile outputs in plan order in, its GeoTIFF out, row band by row band."""

    def __init__(self, scene: WindowedScene, destination: Path | StagedFile, *, cog: bool = False) -> None:
        pipeline = scene.pipeline
        if not pipeline.writes_raster:
            raise RequestError(f"the {pipeline.task} IO processor writes no raster; its scenes are not streamed")
        self.scene = scene
        self.stitcher = RowStitcher(scene.plan)
        resampling = "nearest" if pipeline.task == "segmentation" else "average"
        self.writer = GeoTiffRowWriter(destination, scene.plan.height, scene.plan.width, scene.georef, pipeline.output_nodata,
                                       cog=cog, resampling=resampling)

    @property
    def done(self) -> bool:
        return self.stitcher.done

    def add(self, outputs: Sequence[torch.Tensor]) -> None:
        """The next tiles' outputs (in plan order); writes every band of rows they finish."""
        if not all(bool(torch.isfinite(output).all()) for output in outputs):
            raise RequestError(
                "the model produced no valid output for this image (NaN or infinite values; the log says why)"
            )
        try:
            finished = self.stitcher.add(outputs)
        except ValueError as error:
            raise RequestError(str(error)) from None
        for top, values in finished:  # bands of at most RowStitcher.ROWS rows: small temporaries
            mask = self.scene.nodata_rows(top, values.shape[1])
            self.writer.write(self.scene.pipeline.raster_rows(values, mask))

    def close(self) -> Path:
        if not self.stitcher.done:
            self.writer.abort()
            raise RequestError(f"{self.stitcher.added} of {len(self.scene.plan)} tile outputs arrived; nothing was written")
        return self.writer.close()

    def abort(self) -> None:
        self.writer.abort()
