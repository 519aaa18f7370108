"""Request schema, output files, GeoTIFF decoding and coordinates (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from vllm_terratorch.errors import RequestError
from vllm_terratorch.io.coords import centre_lon_lat
from vllm_terratorch.io.geotiff import encode_geotiff, read_geotiff
from vllm_terratorch.io.outputs import output_file, write_new_file
from vllm_terratorch.io.schema import parse_request
from vllm_terratorch.samples import write_sample_geotiff

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
        ({"colour": "red"}, "data.colour"),
    ],
)
def test_bad_requests_name_the_field(change, message):
    with pytest.raises(RequestError, match=message):
        parse_request({**MISSION, **change})
    with pytest.raises(RequestError, match="must be an object"):
        parse_request("just a string")


def test_output_files_stay_inside_and_never_overwrite(tmp_path):
    assert output_file(tmp_path, None, "pooling-abc") == tmp_path / "pooling-abc.tiff"
    assert output_file(tmp_path, "sub/result.tif", None) == tmp_path / "sub" / "result.tif"
    for bad in ("/tmp/x.tif", "../x.tif", "a/../../x.tif", "a\\..\\x.tif"):
        with pytest.raises(RequestError, match="relative file name"):
            output_file(tmp_path, bad, None)
    hostile = output_file(tmp_path, None, "../../etc/cron.d/x")
    assert hostile.parent == tmp_path and ".." not in hostile.name
    write_new_file(tmp_path / "done.tif", b"one")
    with pytest.raises(RequestError, match="already exists"):
        output_file(tmp_path, "done.tif", None)
    with pytest.raises(RequestError, match="already exists"):
        write_new_file(tmp_path / "done.tif", b"two")
    assert (tmp_path / "done.tif").read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.tif"]  # no temp files left


def test_geotiff_round_trip_keeps_georeference(tmp_path):
    path = write_sample_geotiff(tmp_path / "s.tif", 20, 30)
    raster = read_geotiff(path.read_bytes(), max_pixels=1000)
    assert raster.array.shape == (6, 20, 30) and raster.nodata == -9999
    encoded = encode_geotiff(np.ones((20, 30), dtype=np.uint8), raster, nodata=255)
    back = read_geotiff(encoded, max_pixels=1000)
    assert (back.crs, back.transform, back.nodata) == (raster.crs, raster.transform, 255)
    lon, lat = centre_lon_lat(raster)
    with rasterio.open(path) as source:
        assert np.allclose((lon, lat), source.lnglat())


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"plain text", "not a readable GeoTIFF"), (b"II*\x00\x08\x00\x00\x00\x00", "not a readable GeoTIFF")],
)
def test_bad_geotiffs(data, message):
    with pytest.raises(RequestError, match=message):
        read_geotiff(data, max_pixels=1000)


def test_pixel_limit_and_truncation(tmp_path):
    data = write_sample_geotiff(tmp_path / "s.tif", 40, 40).read_bytes()
    with pytest.raises(RequestError, match="limit is 1000 pixels"):
        read_geotiff(data, max_pixels=1000)
    with pytest.raises(RequestError, match="not a readable GeoTIFF"):
        read_geotiff(data[: len(data) // 2], max_pixels=10_000)


def test_png_is_not_a_geotiff(tmp_path):
    with rasterio.open(tmp_path / "x.png", "w", driver="PNG", width=4, height=4, count=1, dtype="uint8") as target:
        target.write(np.zeros((1, 4, 4), dtype=np.uint8))
    with pytest.raises(RequestError, match="expected a GeoTIFF"):
        read_geotiff((tmp_path / "x.png").read_bytes(), max_pixels=1000)


@pytest.mark.parametrize(
    ("tags", "name", "expected"),
    [
        ({"TIFFTAG_DATETIME": "2024:10:26 10:50:31"}, None, (2024, 300)),
        ({}, "https://huggingface.co/x/resolve/main/valencia_example_2024-10-26.tiff", (2024, 300)),
        ({}, "S2A_MSIL2A_20240105T105031_N0510.tif", (2024, 5)),
        ({}, "scene_2023_02_01.tif", (2023, 32)),
        ({}, "scene.tif", None),
        ({}, "scene_2024-13-45.tif", None),
    ],
)
def test_acquisition_date(tags, name, expected):
    from vllm_terratorch.io.coords import acquisition_date, year_and_day

    when = acquisition_date(tags, name)
    assert (year_and_day(when) if when else None) == expected
