"""GeoTIFF bytes <-> arrays with their georeference (CRS, transform, nodata), via rasterio."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vllm_terratorch.errors import RequestError


@dataclass(frozen=True)
class Georef:
    """Where an image lies (CRS, transform), its nodata value and tags: what an output copies."""

    crs: Any
    transform: Any
    nodata: float | None
    tags: dict[str, str] = field(default_factory=dict)


class Grid(Protocol):
    """Where an image lies, and its size: what grid checks and coordinates need (a decoded
    `Raster`, or an open file's `RasterFile` whose pixels stay on disk)."""

    crs: Any
    transform: Any
    tags: dict[str, str]

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...


@dataclass(frozen=True)
class Raster:
    """A decoded image: (bands, height, width) plus what is needed to georeference outputs."""

    array: np.ndarray
    crs: Any
    transform: Any
    nodata: float | None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def georef(self) -> Georef:
        return Georef(self.crs, self.transform, self.nodata, self.tags)

    @property
    def height(self) -> int:
        return int(self.array.shape[1])

    @property
    def width(self) -> int:
        return int(self.array.shape[2])


@dataclass(frozen=True)
class RasterHeader:
    """What a GeoTIFF declares before any pixel is decoded."""

    bands: int
    height: int
    width: int
    dtypes: tuple[str, ...]
    block_shapes: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, source: Any) -> RasterHeader:
        """The header of an open rasterio dataset."""
        return cls(
            bands=source.count,
            height=source.height,
            width=source.width,
            dtypes=tuple(source.dtypes),
            block_shapes=tuple(tuple(shape) for shape in source.block_shapes) if source.count else (),
        )

    @property
    def decoded_bytes(self) -> int:
        """Memory the decoded pixels take: height x width x bands x bytes per sample."""
        return self.height * self.width * sum(np.dtype(dtype).itemsize for dtype in self.dtypes)


@dataclass(frozen=True)
class RasterLimits:
    """How large a decoded input may be (the server's `max_pixels`, `max_raster_bytes`)."""

    max_pixels: int
    max_bytes: int

    def check(self, header: RasterHeader) -> None:
        """A raster decoded whole: its pixels and bytes within the limits, and each block."""
        self._check_format(header)
        if header.width * header.height > self.max_pixels:
            raise RequestError(
                f"the GeoTIFF is {header.width}x{header.height} pixels; the server's limit is {self.max_pixels} pixels"
            )
        if header.decoded_bytes > self.max_bytes:
            raise RequestError(
                f"the GeoTIFF declares {header.bands} bands of {header.width}x{header.height} "
                f"({header.decoded_bytes} bytes decoded); the server's limit is {self.max_bytes} bytes"
            )
        self._check_blocks(header)

    def check_windowed(self, header: RasterHeader) -> None:
        """A raster read window by window (never whole): any size, but a readable pixel type and
        blocks that can each be decoded within the byte limit."""
        self._check_format(header)
        self._check_blocks(header)

    @staticmethod
    def _check_format(header: RasterHeader) -> None:
        if header.width < 1 or header.height < 1 or header.bands < 1:
            raise RequestError(f"the GeoTIFF is empty ({header.bands} bands, {header.width}x{header.height})")
        odd = sorted({dtype for dtype in header.dtypes if np.dtype(dtype).kind not in "iuf"})
        if odd:
            raise RequestError(f"the GeoTIFF's pixels are {', '.join(odd)}; expected integer or floating-point bands")

    def _check_blocks(self, header: RasterHeader) -> None:
        widest = max(np.dtype(dtype).itemsize for dtype in header.dtypes)
        for rows, cols in set(header.block_shapes):
            # A block is decoded whole (all bands when pixel-interleaved), however small the image.
            if rows < 1 or cols < 1 or rows * cols * widest * header.bands > self.max_bytes:
                raise RequestError(
                    f"the GeoTIFF declares {rows}x{cols}-pixel blocks of {header.bands} bands; decoding one "
                    f"would exceed the server's limit of {self.max_bytes} bytes"
                )


def read_geotiff(data: bytes, limits: RasterLimits, check: Callable[[RasterHeader], None] | None = None) -> Raster:
    """Decode a GeoTIFF; `limits` and then `check` judge the header before any pixel is decoded."""
    import rasterio
    from rasterio.errors import RasterioError

    if not data:
        raise RequestError("the input is empty; expected a GeoTIFF")
    try:
        with rasterio.MemoryFile(data) as memory, memory.open() as source:
            if source.driver != "GTiff":
                raise RequestError(f"the input is a {source.driver} raster; expected a GeoTIFF")
            header = RasterHeader.of(source)
            limits.check(header)
            if check is not None:
                check(header)
            array = source.read()
            return Raster(array=array, crs=source.crs, transform=source.transform, nodata=source.nodata, tags=source.tags())
    except RasterioError as error:
        raise RequestError(f"the input is not a readable GeoTIFF: {error}") from None


def encode_geotiff(array: np.ndarray, like: Georef | Raster, nodata: float | None = None) -> bytes:
    """(bands, H, W) array -> GeoTIFF bytes with `like`'s CRS and transform."""
    import rasterio

    if array.ndim == 2:
        array = array[None]
    profile = {
        "driver": "GTiff",
        "height": array.shape[1],
        "width": array.shape[2],
        "count": array.shape[0],
        "dtype": array.dtype.name,
        "crs": like.crs,
        "transform": like.transform,
        "compress": "lzw",
    }
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.MemoryFile() as memory:
        with memory.open(**profile) as target:
            target.write(array)
        return memory.read()


def check_one_grid(rasters: Sequence[Grid], modalities: list[str] | None = None) -> None:
    """The frames of a time series, or the modalities of a scene, must share one grid (they are
    stacked pixel by pixel; nothing here resamples)."""
    names = modalities or [f"input {index}" for index in range(1, len(rasters) + 1)]
    first = rasters[0]
    for name, raster in zip(names[1:], rasters[1:], strict=True):
        for what, mine, theirs in (("size", (raster.height, raster.width), (first.height, first.width)),
                                   ("CRS", raster.crs, first.crs), ("transform", raster.transform, first.transform)):
            if mine != theirs:
                raise RequestError(f"{name} is not on {names[0]}'s grid: its {what} is {mine}, {names[0]}'s is {theirs}")


def nodata_mask(array: np.ndarray, nodata: float | None) -> np.ndarray:
    """(1, H, W): pixels that are NaN/infinite or the file's nodata value in any band."""
    invalid = ~np.isfinite(array) if np.issubdtype(array.dtype, np.floating) else np.zeros(array.shape, bool)
    if nodata is not None and np.isfinite(nodata):
        invalid |= array == nodata
    return invalid.any(axis=0, keepdims=True)
