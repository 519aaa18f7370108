"""Request schema, output files, GeoTIFF decoding and coordinates (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from vllm_terratorch.errors import RequestError
from vllm_terratorch.io.coords import centre_lat_lon
from vllm_terratorch.io.geotiff import RasterLimits, encode_geotiff, read_geotiff
from vllm_terratorch.io.schema import parse_request
from vllm_terratorch.testing.samples import write_sample_geotiff

MISSION = {"data": "https://example.org/x.tiff", "data_format": "url", "out_data_format": "path", "image_format": "geoTiff"}


def test_mission_request_parses():
    request = parse_request(MISSION)
    assert (request.data_format, request.out_data_format, request.image_format) == ("url", "path", "geoTiff")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data_format": "s3"}, "data.data_format"),
        ({"out_data_format": "png"}, "data.out_data_format"),
        ({"image_format": "png"}, "data.image_format"),
        ({"data": ""}, "data.data"),
        ({"indices": [-1]}, "indices"),
        ({"indices": "0,1"}, "data.indices"),
        ({"out_path": 3}, "data.out_path"),
    ],
)
def test_bad_requests_name_the_field(change, message):
    with pytest.raises(RequestError, match=message):
        parse_request({**MISSION, **change})
    with pytest.raises(RequestError, match="must be an object"):
        parse_request("just a string")


@pytest.mark.parametrize("image_format", ["", "tiff", "TIFF", "tif", "geoTiff", "GeoTIFF", "geotiff"])
def test_upstream_image_formats_are_accepted(image_format):
    """vLLM's examples send "tiff", TerraTorch's integration tests "", the mission "geoTiff"."""
    assert parse_request({**MISSION, "image_format": image_format}).image_format == image_format


def test_unknown_fields_are_ignored_and_logged(caplog):
    from vllm_terratorch.log import logger

    logger.setLevel("DEBUG")
    logger.addHandler(caplog.handler)
    try:
        request = parse_request({**MISSION, "colour": "red", "model": "m"})
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel("NOTSET")
    assert not hasattr(request, "colour")
    assert "['colour', 'model']" in caplog.text and "ignored" in caplog.text


def test_geotiff_round_trip_keeps_georeference(tmp_path):
    path = write_sample_geotiff(tmp_path / "s.tif", 20, 30)
    raster = read_geotiff(path.read_bytes(), RasterLimits(1000, 10**9))
    assert raster.array.shape == (6, 20, 30) and raster.nodata == -9999
    encoded = encode_geotiff(np.ones((20, 30), dtype=np.uint8), raster, nodata=255)
    back = read_geotiff(encoded, RasterLimits(1000, 10**9))
    assert (back.crs, back.transform, back.nodata) == (raster.crs, raster.transform, 255)
    lat, lon = centre_lat_lon(raster)
    with rasterio.open(path) as source:
        assert np.allclose((lon, lat), source.lnglat(), atol=1e-3)  # (lat, lon) order, near the centre


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"plain text", "not a readable GeoTIFF"), (b"II*\x00\x08\x00\x00\x00\x00", "not a readable GeoTIFF")],
)
def test_bad_geotiffs(data, message):
    with pytest.raises(RequestError, match=message):
        read_geotiff(data, RasterLimits(1000, 10**9))


def test_pixel_limit_and_truncation(tmp_path):
    data = write_sample_geotiff(tmp_path / "s.tif", 40, 40).read_bytes()
    with pytest.raises(RequestError, match="limit is 1000 pixels"):
        read_geotiff(data, RasterLimits(1000, 10**9))
    with pytest.raises(RequestError, match="not a readable GeoTIFF"):
        read_geotiff(data[: len(data) // 2], RasterLimits(10_000, 10**9))


def test_png_is_not_a_geotiff(tmp_path):
    with rasterio.open(tmp_path / "x.png", "w", driver="PNG", width=4, height=4, count=1, dtype="uint8") as target:
        target.write(np.zeros((1, 4, 4), dtype=np.uint8))
    with pytest.raises(RequestError, match="expected a GeoTIFF"):
        read_geotiff((tmp_path / "x.png").read_bytes(), RasterLimits(1000, 10**9))


@pytest.mark.parametrize(
    ("tags", "name", "expected"),
    [
        ({"TIFFTAG_DATETIME": "2024:10:26 10:50:31"}, None, (2024, 299)),
        ({}, "https://huggingface.co/x/resolve/main/valencia_example_2024-10-26.tiff", (2024, 299)),
        ({}, "S2A_MSIL2A_20240105T105031_N0510.tif", (2024, 4)),
        ({}, "scene_2023_02_01.tif", (2023, 31)),
        ({}, "scene.tif", None),
        ({}, "scene_2024-13-45.tif", None),
    ],
)
def test_acquisition_date(tags, name, expected):
    from vllm_terratorch.io.coords import acquisition_date, year_and_day

    when = acquisition_date(tags, name)
    assert (year_and_day(when) if when else None) == expected


def _declared(tmp_path, name, **profile):
    """A small file that declares `profile` (zeros compress to almost nothing)."""
    base = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint8", "compress": "deflate"}
    base.update(profile)
    path = tmp_path / name
    with rasterio.open(path, "w", **base) as target:
        target.write(np.zeros((base["count"], base["height"], base["width"]), dtype=base["dtype"]))
    return path.read_bytes()


def test_header_limits_come_before_any_pixel_is_read(tmp_path, monkeypatch):
    seen = []

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    bands = _declared(tmp_path, "bands.tif", count=3000)
    wide = _declared(tmp_path, "wide.tif", count=6, dtype="float64")
    striped = _declared(tmp_path, "striped.tif", width=2000, height=64, blockysize=64)
    monkeypatch.setattr(rasterio.io.DatasetReader, "read", no_decoding)
    limits = RasterLimits(max_pixels=10**6, max_bytes=64 * 64 * 6 * 4)
    with pytest.raises(RequestError, match=r"declares 3000 bands of 64x64 \(12288000 bytes decoded\).*limit is 98304 bytes"):
        read_geotiff(bands, limits)
    with pytest.raises(RequestError, match=r"declares 6 bands .*196608 bytes decoded"):
        read_geotiff(wide, limits)
    with pytest.raises(RequestError, match="limit is 1000 pixels"):
        read_geotiff(striped, RasterLimits(max_pixels=1000, max_bytes=10**9))
    big_tiles = _declared(tmp_path, "tiles.tif", tiled=True, blockxsize=2048, blockysize=2048)
    with pytest.raises(RequestError, match=r"2048x2048-pixel blocks of 1 bands; decoding one would exceed"):
        read_geotiff(big_tiles, RasterLimits(max_pixels=10**6, max_bytes=10**6))

    def refuse(header):
        seen.append(header)
        raise RequestError("refused by the caller")

    with pytest.raises(RequestError, match="refused by the caller"):
        read_geotiff(_declared(tmp_path, "ok.tif"), limits, refuse)
    assert (seen[0].bands, seen[0].height, seen[0].width, seen[0].dtypes) == (1, 64, 64, ("uint8",))
