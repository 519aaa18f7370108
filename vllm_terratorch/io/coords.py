"""Coordinates a Prithvi-style model takes, derived from the GeoTIFF's georeference."""

from __future__ import annotations

from datetime import date

import numpy as np

from vllm_terratorch.io.geotiff import Raster


def centre_lon_lat(raster: Raster) -> tuple[float, float] | None:
    """(longitude, latitude) of the image centre in EPSG:4326, or None without a CRS."""
    if raster.crs is None:
        return None
    from rasterio.warp import transform

    x, y = raster.transform @ (raster.width / 2, raster.height / 2)
    lons, lats = transform(raster.crs, "EPSG:4326", [x], [y])
    lon, lat = float(lons[0]), float(lats[0])
    if not (np.isfinite(lon) and np.isfinite(lat)):
        return None
    return lon, lat


def year_and_day(when: date) -> tuple[int, int]:
    """(year, day of year): the temporal coordinate layout of Prithvi-EO-2.0 TL models."""
    return when.year, when.timetuple().tm_yday
