"""Time-series requests through the GeoTIFF pipeline (io/pipeline.py): `data` is a list of files, one
per frame, for a multi-temporal model; each frame is prepared exactly as a single-image request
would be, every frame is cut at the same windows, and `temporal_coords` has one date per frame."""

from __future__ import annotations

import pytest
import torch

from vllm_terratorch.core.config import parse_pretrained_cfg
from vllm_terratorch.errors import RequestError
from vllm_terratorch.io.tasks import RegressionPipeline, SegmentationPipeline
from vllm_terratorch.io.schema import GeoTiffRequest
from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_sample_geotiff

DATES = ["2024-03-01", "2024-06-15", "2024-10-26"]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    return [write_sample_geotiff(root / f"frame{i}.tif", 100, 90, seed=i, date=day) for i, day in enumerate(DATES)]


def pipeline(frames_per_request: int | None, cls=SegmentationPipeline):
    return cls(parse_pretrained_cfg(sample_pretrained_cfg("segmentation", frames=frames_per_request)), torch.float32)


def images(prompts, name="pixel_values"):
    return torch.stack([prompt["multi_modal_data"]["image"][name] for prompt in prompts])


def test_each_frame_is_prepared_like_a_single_image_and_cut_at_the_same_windows(frames):
    request = GeoTiffRequest(data=[str(p) for p in frames], data_format="path")
    prompts, pending = pipeline(3).prepare([p.read_bytes() for p in frames], request)
    single = pipeline(None)
    per_frame = [single.prepare(p.read_bytes(), GeoTiffRequest(data=str(p), data_format="path"))[0] for p in frames]
    tiles = images(prompts)
    # 3 x 2 windows: TerraTorch's tiling (100 x 90 padded by delta 8 to 116 x 106, rows at 0, 48, 52)
    assert tiles.shape == (len(pending.plan), 6, 3, 64, 64) and len(pending.plan) == 6
    for t, frame in enumerate(per_frame):
        assert torch.equal(tiles[:, :, t], images(frame))
    first = prompts[0]["multi_modal_data"]["image"]
    assert torch.equal(first["location_coords"], per_frame[0][0]["multi_modal_data"]["image"]["location_coords"])
    # (year, day of year - 1) per frame, as TerraTorch's datasets build them.
    assert first["temporal_coords"].tolist() == [[[2024, 60], [2024, 166], [2024, 299]]]
    assert all(torch.equal(p["multi_modal_data"]["image"]["temporal_coords"], first["temporal_coords"]) for p in prompts)


def test_dates_come_from_the_file_then_its_name_then_the_request(tmp_path):
    untagged = [write_sample_geotiff(tmp_path / f"u{i}.tif", 64, 64, seed=i) for i in range(3)]
    named = write_sample_geotiff(tmp_path / "HLS.S30.T10SEH.2024300T184519.v2.0.tif", 64, 64)
    tagged = write_sample_geotiff(tmp_path / "t.tif", 64, 64, date="2023-01-01")
    files = [tagged, named, untagged[0]]
    request = GeoTiffRequest(data=[str(p) for p in files], data_format="path", dates=["2000-01-01"] * 2 + ["2024-12-31"])
    prompts, _ = pipeline(3).prepare([p.read_bytes() for p in files], request)
    assert prompts[0]["multi_modal_data"]["image"]["temporal_coords"].tolist() == [[[2023, 0], [2024, 299], [2024, 365]]]
    no_dates = GeoTiffRequest(data=[str(p) for p in untagged], data_format="path")
    with pytest.raises(RequestError, match="input 1 of 3 has no TIFFTAG_DATETIME tag and no date in its name"):
        pipeline(3).prepare([p.read_bytes() for p in untagged], no_dates)


@pytest.mark.parametrize(
    ("count", "message"),
    [(2, "this model takes 3 frames"), (1, "this model takes 3 frames"), (4, "got 4")],
)
def test_the_frame_count_must_match_the_model(frames, count, message):
    items = ([str(p) for p in frames] * 2)[:count]
    request = GeoTiffRequest(data=items if count > 1 else items, data_format="path")
    with pytest.raises(RequestError, match=message):
        pipeline(3).read(request)


def test_a_single_image_model_takes_no_list(frames):
    request = GeoTiffRequest(data=[str(p) for p in frames], data_format="path")
    with pytest.raises(RequestError, match="takes one image per request"):
        pipeline(None).read(request)


def test_frames_must_share_one_grid(frames, tmp_path):
    shifted = write_sample_geotiff(tmp_path / "shifted.tif", 100, 90, seed=9, origin=(725030.0, 4375000.0), date=DATES[1])
    smaller = write_sample_geotiff(tmp_path / "smaller.tif", 80, 90, seed=9, date=DATES[1])
    for odd, what in ((shifted, "transform"), (smaller, "size")):
        files = [frames[0], odd, frames[2]]
        request = GeoTiffRequest(data=[str(p) for p in files], data_format="path")
        with pytest.raises(RequestError, match=f"input 2 is not on input 1's grid: its {what}"):
            pipeline(3, RegressionPipeline).prepare([p.read_bytes() for p in files], request)


def test_one_date_per_input(frames):
    request = GeoTiffRequest(data=[str(p) for p in frames], data_format="path", dates=["2024-01-01"])
    with pytest.raises(RequestError, match="'dates' has 1 dates for 3 input"):
        pipeline(3).read(request)
