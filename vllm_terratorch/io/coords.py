"""Coordinates a Prithvi-style model takes, derived from the GeoTIFF's georeference."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime

import numpy as np

from vllm_terratorch.io.geotiff import Raster


def centre_lat_lon(raster: Raster) -> tuple[float, float] | None:
    """(latitude, longitude) in EPSG:4326 of the centre pixel, or None without a CRS.

    As TerraTorch's datasets feed Prithvi's location embedding (column 0 = latitude):
    `_get_coords` takes pixel (H // 2, W // 2) and returns `[lat, lon]`. (TerraTorch's vLLM plugin
    and Prithvi's demo pass `src.lnglat()`, i.e. swapped; we follow the training data.)
    """
    if raster.crs is None:
        return None
    from rasterio.warp import transform

    x, y = raster.transform @ (raster.width // 2 + 0.5, raster.height // 2 + 0.5)
    lons, lats = transform(raster.crs, "EPSG:4326", [x], [y])
    lon, lat = float(lons[0]), float(lats[0])
    if not (np.isfinite(lon) and np.isfinite(lat)):
        return None
    return lat, lon


# 2024-10-26, 2024_10_26, 20241026 (also as in Sentinel-2 names: 20241026T105031).
_NAME_DATE = re.compile(r"(?<!\d)(\d{4})[-_]?(\d{2})[-_]?(\d{2})(?!\d)|(?<!\d)(\d{4})(\d{2})(\d{2})T\d{6}")


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
    return None


def year_and_day(when: date) -> tuple[int, int]:
    """(year, day of year - 1), as TerraTorch's datasets build `temporal_coords` for Prithvi-EO-2.0 TL
    models (`[date.year, date.dayofyear - 1]`: 1 January is day 0)."""
    return when.year, when.timetuple().tm_yday - 1
