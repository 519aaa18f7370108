"""GeoTIFF bytes <-> arrays with their georeference (CRS, transform, nodata), via rasterio."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vllm_terratorch.errors import RequestError


@dataclass(frozen=True)
class Raster:
    """A decoded image: (bands, height, width) plus what is needed to georeference outputs."""

    array: np.ndarray
    crs: Any
    transform: Any
    nodata: float | None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.array.shape[1])

    @property
    def width(self) -> int:
        return int(self.array.shape[2])


def read_geotiff(data: bytes, max_pixels: int) -> Raster:
    """Decode a GeoTIFF; size is checked from the header before any pixel is decoded."""
    import rasterio
    from rasterio.errors import RasterioError

    if not data:
        raise RequestError("the input is empty; expected a GeoTIFF")
    try:
        with rasterio.MemoryFile(data) as memory, memory.open() as source:
            if source.driver != "GTiff":
                raise RequestError(f"the input is a {source.driver} raster; expected a GeoTIFF")
            if source.width < 1 or source.height < 1 or source.count < 1:
                raise RequestError(f"the GeoTIFF is empty ({source.count} bands, {source.width}x{source.height})")
            if source.width * source.height > max_pixels:
                raise RequestError(
                    f"the GeoTIFF is {source.width}x{source.height} pixels; the server's limit is {max_pixels} pixels"
                )
            array = source.read()
            return Raster(array=array, crs=source.crs, transform=source.transform, nodata=source.nodata, tags=source.tags())
    except RasterioError as error:
        raise RequestError(f"the input is not a readable GeoTIFF: {error}") from None


def encode_geotiff(array: np.ndarray, like: Raster, nodata: float | None = None) -> bytes:
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
