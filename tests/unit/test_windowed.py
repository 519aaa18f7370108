"""Scenes read, blended and written window by window (io/windows.py, issue #18) give the bits of the
in-memory path (`prepare` on the decoded file, `stitch`, `render`): tiles, every output kind (class
ids, TerraTorch's encoding, float values), sizes that are not a multiple of the tile, overlap,
nodata, every padding mode, time series; and the output never appears under its name half written."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch

from vllm_terratorch.core.config import parse_pretrained_cfg
from vllm_terratorch.errors import InputError, RequestError
from vllm_terratorch.io.schema import GeoTiffRequest
from vllm_terratorch.io.settings import IOSettings
from vllm_terratorch.io.tasks import RegressionPipeline, SegmentationPipeline
from vllm_terratorch.io.tiling import RowStitcher, TilingConfig, extract_tiles, plan_tiles, stitch
from vllm_terratorch.io.windows import GeoTiffRowWriter, SceneWriter, WindowedScene
from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_sample_geotiff

SIZES = [(150, 131), (64, 64), (30, 20), (1, 77), (300, 97)]


def make_pipeline(task="segmentation", padding="reflect", stride=48, encoding="ids", frames=None, tmp=None):
    cfg = copy.deepcopy(sample_pretrained_cfg(task, frames=frames))
    params = cfg["model"]["init_args"]["tiled_inference_parameters"]
    params |= {"h_stride": stride, "w_stride": stride, "padding": padding}
    cls = SegmentationPipeline if task == "segmentation" else RegressionPipeline
    settings = IOSettings(mask_encoding=encoding, output_path=tmp or Path("/tmp"))
    return cls(parse_pretrained_cfg(cfg), torch.float32, settings)


def scene_file(path: Path, height: int, width: int, seed: int = 0, date: str | None = None) -> Path:
    """A sample scene with nodata pixels in one band, so the nodata mask matters."""
    write_sample_geotiff(path, height, width, seed=seed, date=date)
    with rasterio.open(path, "r+") as target:
        band = target.read(3)
        band[:: 7, :: 5] = -9999
        target.write(band, 3)
    return path


def fake_outputs(count: int, channels: int, crop: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, crop, crop, generator=generator) for _ in range(count)]


def in_memory(pipeline, paths, outputs=None):
    request = GeoTiffRequest(data=[str(p) for p in paths] if len(paths) > 1 else str(paths[0]), data_format="path")
    prompts, pending = pipeline.prepare([p.read_bytes() for p in paths], request)
    tiles = torch.stack([prompt["multi_modal_data"]["image"][pipeline.image_name] for prompt in prompts])
    result = None if outputs is None else pipeline.complete(outputs, pending)
    return request, prompts, tiles, result


def windowed_tiles(scene: WindowedScene, chunk: int) -> torch.Tensor:
    parts = [scene.tiles(start, min(start + chunk, len(scene.plan)))[scene.pipeline.image_name]
             for start in range(0, len(scene.plan), chunk)]
    return torch.cat(parts)


def read(data: bytes | Path):
    with (rasterio.MemoryFile(data).open() if isinstance(data, bytes) else rasterio.open(data)) as source:
        return source.read(), source.crs, source.transform, source.nodata, source.profile


@pytest.mark.parametrize("padding", ["reflect", "constant", "edge"])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_tiles_read_by_window_are_the_tiles_prepare_cuts(tmp_path, padding, height, width):
    pipeline = make_pipeline(padding=padding)
    path = scene_file(tmp_path / "scene.tif", height, width)
    request, prompts, tiles, _ = in_memory(pipeline, [path])
    with WindowedScene(pipeline, request, [path]) as scene:
        assert len(scene.plan) == len(prompts)
        for chunk in (1, 3, 64):  # runs that start and end inside tile rows
            assert torch.equal(windowed_tiles(scene, chunk), tiles)
        extras = prompts[0]["multi_modal_data"]["image"]["location_coords"]
        assert torch.equal(scene.extras["location_coords"], extras)


@pytest.mark.parametrize("layout", ["tiled", "cog", "float32", "uint16"])
def test_tiled_cog_and_other_dtypes_are_read_by_window_alike(tmp_path, layout):
    striped = scene_file(tmp_path / "striped.tif", 150, 131)
    data, *_, profile = read(striped)
    path = tmp_path / f"{layout}.tif"
    if layout == "cog":
        rasterio.shutil.copy(striped, path, driver="COG", blocksize=64)
    else:
        dtype = {"tiled": "int16", "float32": "float32", "uint16": "uint16"}[layout]
        profile |= {"dtype": dtype, "tiled": layout == "tiled", "blockxsize": 64, "blockysize": 64}
        if dtype == "uint16":
            profile["nodata"], data = 0, np.where(data == -9999, 0, data)
        with rasterio.open(path, "w", **profile) as target:
            target.write(data.astype(dtype))
    pipeline = make_pipeline()
    request, _, tiles, _ = in_memory(pipeline, [path])
    with WindowedScene(pipeline, request, [path]) as scene:
        assert torch.equal(windowed_tiles(scene, 5), tiles)
        whole_mask = pipeline.prepare(path.read_bytes(), request)[1].nodata_mask
        assert whole_mask.any() and np.array_equal(scene.nodata_rows(0, 150), whole_mask)


@pytest.mark.parametrize(("task", "encoding"), [("segmentation", "ids"), ("segmentation", "terratorch"), ("regression", "ids")])
@pytest.mark.parametrize("padding", ["reflect", "constant"])
@pytest.mark.parametrize(("height", "width"), [(150, 131), (30, 20), (300, 97)])
def test_a_streamed_output_is_the_in_memory_output(tmp_path, task, encoding, padding, height, width):
    pipeline = make_pipeline(task, padding=padding, encoding=encoding, tmp=tmp_path)
    path = scene_file(tmp_path / "scene.tif", height, width, seed=height)
    channels = 3 if task == "segmentation" else 1
    request, prompts, _, _ = in_memory(pipeline, [path])
    outputs = fake_outputs(len(prompts), channels, 64, seed=width)
    *_, expected = in_memory(pipeline, [path], outputs)
    target = tmp_path / "out" / "scene_pred.tif"
    with WindowedScene(pipeline, request, [path]) as scene:
        writer = SceneWriter(scene, target)
        for start in range(0, len(outputs), 5):
            writer.add(outputs[start : start + 5])
        assert not target.exists()  # nothing under the final name until the last row is written
        writer.close()
    want, got = read(expected), read(target)
    np.testing.assert_array_equal(got[0], want[0])  # NaN == NaN here: float outputs compared bit for bit
    assert got[1:3] == want[1:3]
    assert got[3] == want[3] or (np.isnan(got[3]) and np.isnan(want[3]))
    assert got[4]["tiled"] and got[4]["compress"] == "lzw"
    assert sorted(p.name for p in target.parent.iterdir()) == ["scene_pred.tif"]


def test_a_streamed_time_series_is_the_in_memory_one(tmp_path):
    pipeline = make_pipeline(frames=3, tmp=tmp_path)
    paths = [scene_file(tmp_path / f"f{i}.tif", 140, 101, seed=i, date=f"2024-0{i + 1}-15") for i in range(3)]
    request, prompts, tiles, _ = in_memory(pipeline, paths)
    outputs = fake_outputs(len(prompts), 2, 64)
    *_, expected = in_memory(pipeline, paths, outputs)
    with WindowedScene(pipeline, request, paths) as scene:
        assert torch.equal(windowed_tiles(scene, 4), tiles)
        first = prompts[0]["multi_modal_data"]["image"]
        assert all(torch.equal(scene.extras[name], first[name]) for name in ("temporal_coords", "location_coords"))
        writer = SceneWriter(scene, tmp_path / "pred.tif")
        writer.add(outputs)
        writer.close()
    np.testing.assert_array_equal(read(tmp_path / "pred.tif")[0], read(expected)[0])


@pytest.mark.parametrize(("crop", "stride", "blend"), [(64, 48, True), (64, 64, True), (32, 17, True), (40, 30, False)])
def test_the_row_stitcher_gives_stitch_bit_for_bit(crop, stride, blend):
    config = TilingConfig(h_crop=crop, w_crop=crop, h_stride=stride, w_stride=stride, blend_overlaps=blend)
    plan = plan_tiles(211, 97, config)
    outputs = fake_outputs(len(plan), 2, crop)
    stitcher = RowStitcher(plan)
    rows = []
    for start in range(0, len(plan), 7):
        for top, values in stitcher.add(outputs[start : start + 7]):
            assert top == sum(part.shape[1] for part in rows) and values.shape[1] <= RowStitcher.ROWS
            rows.append(values)
    # Only the rows a later tile still reaches are held, allocated once.
    assert stitcher.done and stitcher.weights.shape == (crop, plan.padded_width)
    assert np.array_equal(np.concatenate(rows, axis=1), stitch(outputs, plan))


@pytest.mark.parametrize("mode", ["reflect", "constant", "edge"])
@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 70), (5, 3), (64, 64), (100, 130)])
def test_padding_by_indices_is_numpys_padding(mode, height, width):
    config = TilingConfig(h_crop=64, w_crop=64, h_stride=48, w_stride=48, padding=mode)
    plan = plan_tiles(height, width, config)
    image = np.random.default_rng(0).normal(size=(2, height, width)).astype(np.float32)
    padded = image
    for axis, size, pad in ((1, height, plan.padded_height - height), (2, width, plan.padded_width - width)):
        widths = [(0, 0)] * 3
        widths[axis] = (0, pad)
        padded = np.pad(padded, widths, mode="edge" if mode == "reflect" and size == 1 else mode)
    reference = np.stack([padded[:, t : t + 64, left : left + 64] for t, left in plan.origins])
    assert np.array_equal(extract_tiles(image, plan), reference)


def test_an_aborted_or_short_output_leaves_no_file(tmp_path):
    georef = read(write_sample_geotiff(tmp_path / "in.tif", 600, 40))
    from vllm_terratorch.io.geotiff import Georef

    writer = GeoTiffRowWriter(tmp_path / "out.tif", 600, 40, Georef(georef[1], georef[2], None), 255)
    writer.write(np.zeros((1, 300, 40), np.uint8))  # one whole block row on disk, the rest buffered
    assert writer.temporary.exists() and not (tmp_path / "out.tif").exists()
    with pytest.raises(RequestError, match="got 300 of its 600 rows"):
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_cog_output(tmp_path):
    pipeline = make_pipeline(tmp=tmp_path)
    path = scene_file(tmp_path / "scene.tif", 700, 650)
    request = GeoTiffRequest(data=str(path), data_format="path")
    with WindowedScene(pipeline, request, [path]) as scene:
        writer = SceneWriter(scene, tmp_path / "pred.tif", cog=True)
        writer.add(fake_outputs(len(scene.plan), 2, 64))
        writer.close()
    with rasterio.open(tmp_path / "pred.tif") as source:
        assert source.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert source.overviews(1)  # overviews for a 700x650 mask
        assert source.nodata == 255 and source.dtypes == ("uint8",)


def test_files_on_different_grids_or_with_the_wrong_bands_are_refused(tmp_path):
    pipeline = make_pipeline(frames=3)
    paths = [scene_file(tmp_path / f"f{i}.tif", 100, 90, date="2024-01-01") for i in range(2)]
    paths.append(write_sample_geotiff(tmp_path / "other.tif", 100, 91, date="2024-01-01"))
    request = GeoTiffRequest(data=[str(p) for p in paths], data_format="path")
    with pytest.raises(RequestError, match="input 3 is not on input 1's grid: its size"):
        WindowedScene(pipeline, request, paths)
    five = write_sample_geotiff(tmp_path / "five.tif", 100, 90, bands=5)
    with pytest.raises(InputError, match="the GeoTIFF has 5 bands; this model takes 6"):
        WindowedScene(make_pipeline(), GeoTiffRequest(data=str(five), data_format="path"), [five])
