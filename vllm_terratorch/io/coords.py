"""Coordinates a Prithvi-style model takes, derived from the GeoTIFF's georeference."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime, timedelta

import numpy as np

from vllm_terratorch.io.geotiff import Grid


def centre_lat_lon(raster: Grid) -> tuple[float, float] | None:
    """(latitude, longitude) in EPSG:4326 of the centre pixel, or None without a CRS.

    Exactly what TerraTorch's datasets fed Prithvi's location embedding in training (column 0 =
    latitude): `_get_coords` (fire_scars, multi_temporal_crop_classification) takes pixel
    (H // 2, W // 2), reprojects that one-pixel raster to EPSG:4326 with rioxarray and reads the
    first pixel centre of the new grid; we compute the same grid with rasterio (the transform
    rioxarray's `reproject` derives, `calculate_default_transform` of the pixel's bounds). For a
    file already in EPSG:4326 that is the pixel's own centre (sen1floods11's `_get_coords`).
    TerraTorch's vLLM plugin and Prithvi's demo pass `src.lnglat()` instead, i.e. (lon, lat)
    swapped; we follow the training data.
    """
    if raster.crs is None:
        return None
    from rasterio.errors import RasterioError
    from rasterio.warp import calculate_default_transform

    column, row = raster.width // 2, raster.height // 2
    left, top = raster.transform @ (column, row)
    right, bottom = raster.transform @ (column + 1, row + 1)
    try:
        grid, _, _ = calculate_default_transform(
            raster.crs, "EPSG:4326", 1, 1, left=min(left, right), bottom=min(top, bottom), right=max(left, right), top=max(top, bottom)
        )
    except (RasterioError, ValueError):
        return None
    lon, lat = grid @ (0.5, 0.5)
    if not (np.isfinite(lon) and np.isfinite(lat)):
        return None
    return float(lat), float(lon)


# 2024-10-26, 2024_10_26, 20241026 (also as in Sentinel-2 names: 20241026T105031).
_NAME_DATE = re.compile(r"(?<!\d)(\d{4})[-_]?(\d{2})[-_]?(\d{2})(?!\d)|(?<!\d)(\d{4})(\d{2})(\d{2})T\d{6}")
# Year and day of year before a time, as in HLS names (HLS.S30.T10SEH.2024300T184519): TerraTorch's
# multi-temporal datasets read dates with the pattern `\d{7,8}T\d{6}`.
_NAME_ORDINAL_DATE = re.compile(r"(?<!\d)(\d{4})(\d{3})T\d{6}")


def acquisition_date(tags: Mapping[str, str], name: str | None) -> date | None:
    """When the image was taken: the TIFF DATETIME tag, else a date in the file name."""
    stamp = tags.get("TIFFTAG_DATETIME") or tags.get("ACQUISITION_DATE")
    if stamp:
        for layout in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
            try:
                return datetime.strptime(stamp.strip()[: len(layout) + 2], layout).date()
            except ValueError:
                continue
    for match in _NAME_DATE.finditer(name or ""):
        year, month, day = (int(g) for g in (match.groups()[:3] if match.group(1) else match.groups()[3:]))
        try:
            return date(year, month, day)
        except ValueError:
            continue
    for match in _NAME_ORDINAL_DATE.finditer(name or ""):
        year, day = int(match.group(1)), int(match.group(2))
        if 1 <= day <= (366 if date(year, 12, 31).timetuple().tm_yday == 366 else 365):
            return date(year, 1, 1) + timedelta(days=day - 1)
    return None


def year_and_day(when: date) -> tuple[int, int]:
    """(year, day of year - 1), as TerraTorch's datasets build `temporal_coords` for Prithvi-EO-2.0 TL
    models (`[date.year, date.dayofyear - 1]`: 1 January is day 0)."""
    return when.year, when.timetuple().tm_yday - 1
