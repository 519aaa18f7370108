"""The general path (the model's own datamodule run on a folder holding the request's files) against
TerraTorch's own code, and the hand-written fast path against the general path, bit for bit.

The reference is TerraTorch's vLLM helper `generate_datamodule` (what its TerraMind IO processor
calls) on a folder laid out as its docs say, `setup("predict")`, one batch, `datamodule.aug`: none
of our code is involved in computing it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from vllm_terratorch.core.config import parse_pretrained_cfg
from vllm_terratorch.errors import ConfigError, RequestError
from vllm_terratorch.io.datamodule import DatamoduleInputs, takes_predict_folder
from vllm_terratorch.io.preprocessing import fast_path_covers
from vllm_terratorch.io.schema import parse_request
from vllm_terratorch.io.tasks import RegressionPipeline, SegmentationPipeline
from vllm_terratorch.testing.samples import (
    BANDS,
    sample_pretrained_cfg,
    sample_terramind_cfg,
    write_sample_geotiff,
)


def terratorch_predict_batch(data_cfg: dict, predict_root) -> dict | torch.Tensor:
    """TerraTorch's own predict pipeline, as its TerraMind IO processor runs it."""
    from terratorch.vllm.plugins import generate_datamodule

    cfg = copy.deepcopy(data_cfg)
    cfg["init_args"]["predict_data_root"] = predict_root
    datamodule = generate_datamodule(cfg)
    datamodule.batch_size = 1
    datamodule.setup("predict")
    batch = next(iter(datamodule.predict_dataloader()))
    return datamodule.aug(batch)["image"]


def with_nodata(path: Path, value: int = -9999) -> Path:
    """Some pixels set to the file's nodata value (the datamodule replaces them)."""
    with rasterio.open(path, "r+") as target:
        array = target.read()
        array[:, 3:9, 5:11] = value
        target.write(array)
    return path


def pipeline(cfg: dict, cls=SegmentationPipeline, media: Path | None = None):
    return cls(parse_pretrained_cfg(cfg), torch.float32, allowed_local_media_path=str(media) if media else None)


def image_of(pipe, files: list[Path] | dict[str, Path], **request) -> dict[str, torch.Tensor]:
    """The untiled model input of a request whose image is exactly one tile."""
    data = {k: str(v) for k, v in files.items()} if isinstance(files, dict) else [str(p) for p in files]
    parsed = parse_request({"data": data if len(data) != 1 or isinstance(data, dict) else data[0],
                            "data_format": "path", **request})
    prompts, pending = pipe.prepare(pipe.read(parsed), parsed)
    assert len(prompts) == 1
    return dict(prompts[0]["multi_modal_data"]["image"])


def _fast(cfg, scene, request):
    raster = _raster(scene)
    return pipeline(cfg).prepare_pixels(raster.array, raster.nodata, request)[0]


@pytest.mark.parametrize("task", ["segmentation", "regression"])
def test_the_fast_path_equals_the_datamodule_bit_for_bit(tmp_path, task):
    cfg = sample_pretrained_cfg(task)
    assert fast_path_covers(cfg["data"]) and takes_predict_folder(cfg["data"])
    scene = with_nodata(write_sample_geotiff(tmp_path / "scene_S2Hand.tif", 64, 64, seed=3))
    fast = _fast(cfg, scene, parse_request({"data": "x", "data_format": "path"}))
    general = DatamoduleInputs(cfg["data"], ["image"]).run({"image": scene.read_bytes()})["image"]
    reference = terratorch_predict_batch(cfg["data"], str(tmp_path))[0].numpy()
    assert general.dtype == fast.dtype == np.float32
    assert np.array_equal(general, reference)
    assert np.array_equal(fast, general)


def test_the_fast_path_equals_the_datamodule_when_it_selects_bands(tmp_path):
    cfg = sample_pretrained_cfg("segmentation")
    cfg["data"]["init_args"]["dataset_bands"] = ["COASTAL", *BANDS, "CLOUD"]  # the file has 8; the model takes 6
    scene = with_nodata(write_sample_geotiff(tmp_path / "scene_S2Hand.tif", 64, 64, bands=8, seed=4))
    fast = _fast(cfg, scene, parse_request({"data": "x", "data_format": "path"}))
    reference = terratorch_predict_batch(cfg["data"], str(tmp_path))[0].numpy()
    assert fast.shape == (6, 64, 64)
    assert np.array_equal(fast, reference)


def _raster(path: Path):
    from vllm_terratorch.io.geotiff import RasterLimits, read_geotiff

    return read_geotiff(path.read_bytes(), RasterLimits(10**8, 10**10))


@pytest.mark.parametrize("task", ["segmentation", "regression"])
def test_a_multimodal_datamodule_is_run_as_terratorch_runs_it(tmp_path, task):
    """GenericMultiModalDataModule (outside the hand-written four), two of its dataset classes."""
    cfg = sample_terramind_cfg(("S2L2A", "S1RTC", "DEM"))
    cfg["data"]["init_args"]["task"] = task
    assert not fast_path_covers(cfg["data"]) and takes_predict_folder(cfg["data"])
    folder = tmp_path / "scene"
    for seed, (name, bands) in enumerate({"S2L2A": 12, "S1RTC": 2, "DEM": 1}.items()):
        (folder / name).mkdir(parents=True)
        with_nodata(write_sample_geotiff(folder / name / f"tile_{name}.tif", 64, 64, bands=bands, seed=seed))
    reference = terratorch_predict_batch(cfg["data"], {name: str(folder / name) for name in ("S2L2A", "S1RTC", "DEM")})
    cls = SegmentationPipeline if task == "segmentation" else RegressionPipeline
    pipe = pipeline(cfg, cls, media=tmp_path)
    assert pipe.modalities == ["S2L2A", "S1RTC", "DEM"] and pipe.datamodule is not None
    by_name = image_of(pipe, {name: folder / name / f"tile_{name}.tif" for name in ("S1RTC", "DEM", "S2L2A")})
    as_folder = image_of(pipe, [folder])  # upstream's layout: one sub-folder per modality
    for name in ("S2L2A", "S1RTC", "DEM"):
        assert np.array_equal(by_name[name].numpy(), reference[name][0].numpy()), name
        assert np.array_equal(as_folder[name].numpy(), reference[name][0].numpy()), name


def test_a_stacked_time_series_file_is_read_by_the_datamodule_and_equals_the_frames_form(tmp_path):
    """expand_temporal_dimension: one file of T x C bands (grouped per time step) or T files."""
    cfg = sample_pretrained_cfg("regression", frames=3)
    cfg["data"]["init_args"]["expand_temporal_dimension"] = True
    frames = [write_sample_geotiff(tmp_path / f"f{t}.tif", 64, 64, seed=10 + t, date=f"2024-0{t + 1}-10") for t in range(3)]
    arrays = [rasterio.open(path).read() for path in frames]
    stacked = tmp_path / "series_S2Hand.tif"
    with rasterio.open(frames[0]) as source:
        profile = source.profile | {"count": 18}
    with rasterio.open(stacked, "w", **profile) as target:
        target.write(np.concatenate(arrays))
        target.update_tags(TIFFTAG_DATETIME="2024:01:10 10:30:00")
    pipe = pipeline(cfg, RegressionPipeline, media=tmp_path)
    assert pipe.fast and pipe.datamodule is not None
    as_frames = image_of(pipe, frames)
    dates = ["2024-01-10", "2024-02-10", "2024-03-10"]
    as_one_file = image_of(pipe, [stacked], dates=dates)
    assert as_one_file["x"].shape == (6, 3, 64, 64)
    assert torch.equal(as_frames["x"], as_one_file["x"])
    assert torch.equal(as_frames["temporal_coords"], as_one_file["temporal_coords"])
    with pytest.raises(RequestError, match="give 'dates', one ISO date per time step"):
        image_of(pipe, [stacked])


def benchmark_reference(class_path: str, init_args: dict, root: Path) -> torch.Tensor:
    """TerraTorch's benchmark datamodule on a folder laid out as its dataset is published, split
    "val"/"test" as its predict stage reads it: one batch, `datamodule.aug`."""
    from terratorch.datamodules import __dict__ as datamodules

    datamodule = datamodules[class_path.rsplit(".", 1)[-1]](**(init_args | {"data_root": str(root), "batch_size": 1}))
    datamodule.setup("predict")
    batch = next(iter(datamodule.predict_dataloader()))
    return datamodule.aug(batch)["image"][0]


def _label_beside(image: Path, label: Path) -> None:
    """A label file as the benchmark ships it (classes 1..2; the dataset opens it with the image)."""
    with rasterio.open(image) as source:
        profile = source.profile | {"count": 1, "dtype": "uint8", "nodata": None}
    label.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(label, "w", **profile) as target:
        target.write(np.random.default_rng(0).integers(1, 3, (1, profile["height"], profile["width"]), dtype=np.uint8))


@pytest.mark.parametrize("bands", [None, ["BLUE", "GREEN", "NIR_NARROW", "SWIR_2"]], ids=["all-bands", "four-bands"])
def test_a_fire_scars_fine_tune_is_read_by_its_benchmark_datamodule(tmp_path, bands):
    """FireScarsNonGeoDataModule (outside the hand-written four, no predict folder): the request's
    file is placed where its dataset's validation split is read; its statistics come from TerraTorch."""
    cfg = sample_pretrained_cfg("segmentation")
    class_path = "terratorch.datamodules.FireScarsNonGeoDataModule"
    init_args = {"data_root": "/data/hls_burn_scars"} | ({"bands": bands} if bands else {})
    cfg["data"] = {"class_path": class_path, "init_args": init_args}
    cfg["input"]["data"]["pixel_values"]["shape"][0] = len(bands or BANDS)
    assert takes_predict_folder(cfg["data"]) and not fast_path_covers(cfg["data"])
    published = tmp_path / "hls_burn_scars" / "validation"
    published.mkdir(parents=True)
    scene = with_nodata(write_sample_geotiff(published / "subsetted_512x512HLS.S30.T10SEH.2018190.v1.4_merged.tif", 64, 64, seed=8))
    _label_beside(scene, published / "subsetted_512x512HLS.S30.T10SEH.2018190.v1.4.mask.tif")
    reference = benchmark_reference(class_path, init_args, tmp_path / "hls_burn_scars")
    pipe = pipeline(cfg, media=tmp_path)
    assert pipe.datamodule is not None and "FireScarsNonGeoDataModule" in pipe.describe()
    served = image_of(pipe, [scene])["pixel_values"]
    assert served.shape == (len(bands or BANDS), 64, 64)
    assert torch.equal(served, reference)


def test_a_multi_temporal_crop_fine_tune_is_read_by_its_benchmark_datamodule(tmp_path):
    """MultiTemporalCropClassificationDataModule: one file of 3 x 6 bands (its layout), expanded to
    (C, T, H, W) by the datamodule; dates from the request."""
    cfg = sample_pretrained_cfg("segmentation", frames=3)
    class_path = "terratorch.datamodules.MultiTemporalCropClassificationDataModule"
    init_args = {"data_root": "/data/multi-temporal-crop-classification", "expand_temporal_dimension": True}
    cfg["data"] = {"class_path": class_path, "init_args": init_args}
    assert takes_predict_folder(cfg["data"]) and not fast_path_covers(cfg["data"])
    root = tmp_path / "multi-temporal-crop-classification"
    chips = root / "validation_chips"
    chips.mkdir(parents=True)
    scene = write_sample_geotiff(chips / "chip_088_296_merged.tif", 64, 64, bands=18, seed=9)
    _label_beside(scene, chips / "chip_088_296.mask.tif")
    (root / "validation_data.txt").write_text("chip_000_000\nchip_088_296\n")
    reference = benchmark_reference(class_path, init_args, root)
    pipe = pipeline(cfg, media=tmp_path)
    image = image_of(pipe, [scene], dates=["2022-03-01", "2022-06-01", "2022-09-01"])
    assert image["pixel_values"].shape == (6, 3, 64, 64)
    assert torch.equal(image["pixel_values"], reference)
    assert image["temporal_coords"].tolist() == [[[2022, 59], [2022, 151], [2022, 243]]]


def test_the_sen1floods11_fast_path_equals_its_benchmark_datamodule(tmp_path):
    """The hand-written Sen1Floods11 pipeline (13-band file, constant_scale, nodata) against
    TerraTorch's Sen1Floods11NonGeoDataModule on the published layout; a config with a transform
    the fast path cannot reproduce is run by that datamodule and gives the same bits."""
    cfg = sample_pretrained_cfg("segmentation")
    class_path = "terratorch.datamodules.Sen1Floods11NonGeoDataModule"
    init_args = {"data_root": "/data/sen1floods11", "bands": BANDS, "constant_scale": 0.0001}
    cfg["data"] = {"class_path": class_path, "init_args": init_args}
    assert fast_path_covers(cfg["data"])
    root = tmp_path / "sen1floods11"
    images = root / "v1.1/data/flood_events/HandLabeled/S2Hand"
    images.mkdir(parents=True)
    scene = with_nodata(write_sample_geotiff(images / "Bolivia_103757_S2Hand.tif", 64, 64, bands=13, seed=11))
    _label_beside(scene, root / "v1.1/data/flood_events/HandLabeled/LabelHand/Bolivia_103757_LabelHand.tif")
    (root / "v1.1/splits/flood_handlabeled").mkdir(parents=True)
    (root / "v1.1/splits/flood_handlabeled/flood_test_data.txt").write_text("Bolivia_103757\n")
    reference = benchmark_reference(class_path, init_args, root)
    fast = image_of(pipeline(cfg, media=tmp_path), [scene])["pixel_values"]
    assert torch.equal(fast, reference)
    cfg["data"]["init_args"]["predict_transform"] = [
        {"class_path": "albumentations.HorizontalFlip", "init_args": {"p": 0.0}},
        {"class_path": "albumentations.pytorch.ToTensorV2"},
    ]
    general = pipeline(cfg, media=tmp_path)
    assert not general.fast and general.datamodule is not None
    assert torch.equal(image_of(general, [scene])["pixel_values"], reference)


def test_datamodules_that_cannot_read_a_folder_are_refused_at_start_up():
    cfg = sample_pretrained_cfg("segmentation")
    cfg["data"] = {"class_path": "terratorch.datamodules.Landslide4SenseNonGeoDataModule", "init_args": {"data_root": "x"}}
    assert not takes_predict_folder(cfg["data"])
    with pytest.raises(ConfigError, match="Landslide4SenseNonGeoDataModule"):
        pipeline(cfg)
    tm = sample_terramind_cfg()
    tm["data"]["init_args"]["modalities"] = ["S2L2A"]
    with pytest.raises(ConfigError, match="not the modalities of its datamodule"):
        pipeline(tm)


def test_bad_multimodal_requests_say_what_is_expected(tmp_path):
    pipe = pipeline(sample_terramind_cfg(), media=tmp_path)
    s2 = write_sample_geotiff(tmp_path / "a_S2L2A.tif", 64, 64, bands=12)
    s1 = write_sample_geotiff(tmp_path / "a_S1RTC.tif", 64, 64, bands=2)
    shifted = write_sample_geotiff(tmp_path / "b_S1RTC.tif", 64, 64, bands=2, origin=(725300.0, 4375000.0))
    cases = [
        ({"data": {"S2L2A": str(s2)}}, "missing ['S1RTC']"),
        ({"data": {"S2L2A": str(s2), "S1RTC": str(s1), "DEM": str(s1)}}, "unknown ['DEM']"),
        ({"data": [str(s2), str(s1)]}, "one input per modality"),
        ({"data": str(s2)}, "is not a folder"),
        ({"data": str(tmp_path)}, "S2L2A/: no such sub-folder"),
        ({"data": {"S2L2A": str(s2), "S1RTC": str(shifted)}}, "S1RTC is not on S2L2A's grid: its transform"),
        ({"data": {"S2L2A": str(s1), "S1RTC": str(s1)}},
         "could not read the input (bands per input: S2L2A 2, S1RTC 2; the model takes S2L2A 12, S1RTC 2)"),
    ]
    for request, message in cases:
        with pytest.raises(RequestError, match=re.escape(message)):
            parsed = parse_request(request | {"data_format": "path"})
            pipe.prepare(pipe.read(parsed), parsed)


def test_a_transform_beyond_totensor_sends_the_config_to_the_datamodule(tmp_path):
    """A test_transform the fast path cannot reproduce: the datamodule runs it (here an identity
    flip, so the result equals the fast path's), and a list of files is refused before any is read."""
    cfg = sample_pretrained_cfg("segmentation")
    cfg["data"]["init_args"]["test_transform"] = [
        {"class_path": "albumentations.HorizontalFlip", "init_args": {"p": 0.0}},
        {"class_path": "albumentations.pytorch.ToTensorV2"},
    ]
    assert not fast_path_covers(cfg["data"])
    pipe = pipeline(cfg, media=tmp_path)
    assert not pipe.fast and pipe.datamodule is not None
    scene = with_nodata(write_sample_geotiff(tmp_path / "scene_S2Hand.tif", 64, 64, seed=5))
    plain = pipeline(sample_pretrained_cfg("segmentation"), media=tmp_path)
    assert torch.equal(image_of(pipe, [scene])["pixel_values"], image_of(plain, [scene])["pixel_values"])
    missing = [str(tmp_path / "absent_1.tif"), str(tmp_path / "absent_2.tif")]
    with pytest.raises(RequestError, match="one file per request"):
        pipe.read(parse_request({"data": missing, "data_format": "path"}))
