"""Coordinates as the models were trained: checked against TerraTorch's own dataset code on the
same files (its `_get_coords` / `_get_date`), not against our helper."""

from __future__ import annotations

import types
from datetime import date

import numpy as np
import pandas as pd
import pytest
import rioxarray
from terratorch.datasets.fire_scars import FireScarsNonGeo
from terratorch.datasets.multi_temporal_crop_classification import MultiTemporalCropClassification
from terratorch.datasets.sen1floods11 import Sen1Floods11NonGeo

from vllm_terratorch.io.coords import centre_lat_lon, year_and_day
from vllm_terratorch.io.geotiff import RasterLimits, read_geotiff
from vllm_terratorch.testing.samples import write_sample_geotiff

LIMITS = RasterLimits(10**8, 10**10)
# float32 holds a latitude near 40 to ~4e-6 degrees; TerraTorch returns float32 tensors.
FLOAT32_DEGREES = 1e-5


@pytest.mark.parametrize(
    ("height", "width", "crs", "origin", "pixel"),
    [
        (64, 64, "EPSG:32629", (725000.0, 4375000.0), 30.0),  # Valencia, UTM 29N
        (91, 117, "EPSG:32629", (725000.0, 4375000.0), 30.0),  # odd sizes
        (512, 512, "EPSG:32610", (500000.0, 4200000.0), 30.0),  # California, HLS-like
        (40, 70, "EPSG:32756", (300000.0, 6250000.0), 10.0),  # southern hemisphere
        (64, 80, "EPSG:4326", (-0.4, 39.5), 0.0001),  # already geographic (Sen1Floods11 files)
    ],
)
def test_location_coords_are_terratorchs_lat_lon(tmp_path, height, width, crs, origin, pixel):
    path = write_sample_geotiff(tmp_path / "scene.tif", height, width, crs=crs, origin=origin, pixel_size=pixel)
    ours = np.array(centre_lat_lon(read_geotiff(path.read_bytes(), LIMITS)))
    image = rioxarray.open_rasterio(path, masked=True)
    for dataset in (FireScarsNonGeo, MultiTemporalCropClassification):  # they reproject the centre pixel
        theirs = dataset._get_coords(None, image).double().numpy()
        assert np.abs(ours - theirs).max() <= FLOAT32_DEGREES, (dataset.__name__, ours, theirs)
    if crs == "EPSG:4326":  # Sen1Floods11 reads the centre pixel's own coordinates
        theirs = Sen1Floods11NonGeo._get_coords(None, image).double().numpy()
        assert np.abs(ours - theirs).max() <= FLOAT32_DEGREES


@pytest.mark.parametrize("when", [date(2024, 1, 1), date(2024, 10, 26), date(2023, 12, 31), date(2024, 12, 31)])
def test_temporal_coords_are_terratorchs_year_and_day(when):
    """multi_temporal_crop_classification's `_get_date`: `[date.year, date.dayofyear - 1]`."""
    row = pd.Series({"date": when.isoformat()})
    theirs = MultiTemporalCropClassification._get_date(types.SimpleNamespace(date_columns=["date"]), row)
    assert theirs.tolist() == [list(map(float, year_and_day(when)))]
