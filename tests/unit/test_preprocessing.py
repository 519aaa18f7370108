"""Config-derived preprocessing gives the tensor TerraTorch's own datamodule pipeline gives.

The reference is the real TerraTorch dataset + `datamodule.aug`, run on tiny GeoTIFFs written here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from vllm_terratorch.errors import ConfigError, InputError  # noqa: E402
from vllm_terratorch.io.preprocessing import (  # noqa: E402
    Preprocessing,
    check_band_count,
    preprocessing_from_config,
)

H = W = 8
NODATA = -9999
SEVEN = ["COASTAL_AEROSOL", "BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
SIX = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
# Reflectance-scale stats (after constant_scale 1e-4), so a wrong order of steps shows up clearly.
MEANS = [0.10, 0.11, 0.12, 0.25, 0.20, 0.15]
STDS = [0.03, 0.031, 0.032, 0.08, 0.07, 0.06]

# rioxarray's own use of the affine `*` operator.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


def write_tif(path: Path, array: np.ndarray, nodata: float | None = None) -> None:
    profile = {"driver": "GTiff", "height": array.shape[1], "width": array.shape[2], "count": array.shape[0],
               "dtype": array.dtype.name, "crs": "EPSG:32630",
               "transform": rasterio.transform.from_origin(500000, 4000000, 30, 30)}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def read_tif(path: Path) -> tuple[np.ndarray, float | None]:
    with rasterio.open(path) as src:
        return src.read(), src.nodata


def sample_image(bands: int, dtype: str = "int16") -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 10000, size=(bands, H, W)).astype(dtype)
    image[:, 0, 0] = NODATA if dtype == "int16" else np.nan  # a nodata pixel in every band
    image[2, 3, 4] = NODATA if dtype == "int16" else np.nan  # and one in one band only
    return image


def generic_config(**init_args) -> dict:
    args = {"batch_size": 1, "num_workers": 0, "num_classes": 2, "dataset_bands": SEVEN, "output_bands": SIX,
            "means": MEANS, "stds": STDS, "constant_scale": 0.0001, "no_data_replace": 0.5,
            "test_transform": [{"class_path": "albumentations.pytorch.transforms.ToTensorV2"}]}
    args.update(init_args)
    return {"class_path": "terratorch.datamodules.GenericNonGeoSegmentationDataModule", "init_args": args}


def to_terratorch_bands(bands):
    """config.json (JSON) writes a band interval as a list; LightningCLI hands TerraTorch a tuple."""
    return None if bands is None else [tuple(b) if isinstance(b, list) else b for b in bands]


def terratorch_generic(tmp_path: Path, data: dict, image: np.ndarray, nodata) -> torch.Tensor:
    from terratorch.datamodules import GenericNonGeoSegmentationDataModule

    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    write_tif(tmp_path / "img" / "a_img.tif", image, nodata)
    write_tif(tmp_path / "lbl" / "a_mask.tif", np.zeros((1, H, W), dtype="uint8"))
    args = copy.deepcopy(data["init_args"])
    for key in ("dataset_bands", "output_bands"):
        args[key] = to_terratorch_bands(args.get(key))
    datamodule = GenericNonGeoSegmentationDataModule(
        **args, test_data_root=tmp_path / "img", test_label_data_root=tmp_path / "lbl",
        img_grep="*_img.tif", label_grep="*_mask.tif",
    )
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    return datamodule.aug({"image": batch["image"]})["image"][0]


@pytest.mark.parametrize(
    ("overrides", "dtype"),
    [
        ({}, "int16"),  # names, 7 -> 6 bands, nodata from the file's metadata, replaced then scaled
        ({"dataset_bands": [0, [1, 5], 6], "output_bands": [6, 1, 2, 3, 4, 5]}, "int16"),  # ints, interval, reorder
        ({"no_data_replace": None}, "float32"),  # NaN pixels, not replaced: NaN reaches the model
        ({"means": None, "stds": None, "constant_scale": 1.0, "output_bands": None}, "int16"),  # no normalisation
    ],
)
def test_generic_segmentation_matches_terratorch(tmp_path, overrides, dtype):
    data = generic_config(**overrides)
    image = sample_image(7, dtype)
    nodata = NODATA if dtype == "int16" else None
    expected = terratorch_generic(tmp_path, data, image, nodata).numpy()

    out_bands = data["init_args"]["output_bands"]
    prep = preprocessing_from_config(data, num_model_bands=len(out_bands) if out_bands else 7)
    path = tmp_path / "img" / "a_img.tif"
    ours = prep.apply(*read_tif(path))

    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5, equal_nan=True)
    if overrides == {}:
        # Order: nodata -> no_data_replace, then select, then * constant_scale, then (x - mean) / std.
        replaced = (np.float32(0.5) * np.float32(1e-4) - np.float32(MEANS)) / np.float32(STDS)
        np.testing.assert_allclose(ours[:, 0, 0], replaced, rtol=1e-6)
    if dtype == "float32":
        assert np.isnan(ours[:, 0, 0]).all()


def test_sen1floods11_matches_terratorch(tmp_path):
    from terratorch.datamodules import Sen1Floods11NonGeoDataModule
    from terratorch.datamodules.sen1floods11 import MEANS as S1_MEANS
    from terratorch.datamodules.sen1floods11 import STDS as S1_STDS

    root = tmp_path / "v1.1"
    images = root / "data/flood_events/HandLabeled/S2Hand"
    labels = root / "data/flood_events/HandLabeled/LabelHand"
    splits = root / "splits/flood_handlabeled"
    for folder in (images, labels, splits):
        folder.mkdir(parents=True)
    image = sample_image(13)
    write_tif(images / "Spain_1_S2Hand.tif", image, NODATA)
    write_tif(labels / "Spain_1_LabelHand.tif", np.zeros((1, H, W), dtype="int16"))
    (splits / "flood_test_data.txt").write_text("Spain_1\n")

    data = {"class_path": "Sen1Floods11NonGeoDataModule",
            "init_args": {"bands": ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"], "data_root": "x"}}
    datamodule = Sen1Floods11NonGeoDataModule(**{**data["init_args"], "data_root": str(tmp_path), "batch_size": 1})
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    expected = datamodule.aug({"image": batch["image"]})["image"][0].numpy()

    prep = preprocessing_from_config(data, num_model_bands=6)
    assert prep.band_indices == [1, 2, 3, 8, 11, 12]
    assert prep.expected_file_bands == 13
    assert (prep.scale, prep.nodata_replace) == (0.0001, 0.0)  # the datamodule's defaults
    assert prep.means == [S1_MEANS[b] for b in SIX] and prep.stds == [S1_STDS[b] for b in SIX]
    ours = prep.apply(*read_tif(images / "Spain_1_S2Hand.tif"))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_short_class_name_and_missing_class_path():
    short = generic_config() | {"class_path": "GenericNonGeoSegmentationDataModule"}
    assert preprocessing_from_config(short, 6) == preprocessing_from_config(generic_config(), 6)
    identity = preprocessing_from_config({"init_args": {"means": MEANS}}, 6)
    assert identity == preprocessing_from_config(None, 6)
    image = np.arange(6 * 4, dtype="uint16").reshape(6, 2, 2)
    np.testing.assert_array_equal(identity.apply(image, nodata=0), image.astype(np.float32))


def test_classification_reads_unmasked():
    data = {"class_path": "terratorch.datamodules.GenericNonGeoClassificationDataModule",
            "init_args": {"means": [1.0, 2.0], "stds": [2.0, 4.0], "no_data_replace": 0}}
    prep = preprocessing_from_config(data, 2)
    assert prep.nodata_replace is None and not prep.masks_nodata
    out = prep.apply(np.full((2, 1, 1), 5, dtype="int16"), nodata=5)
    np.testing.assert_allclose(out[:, 0, 0], [2.0, 0.75])


def test_single_mean_broadcasts_like_terratorch():
    prep = preprocessing_from_config(generic_config(means=[1000.0], stds=[500.0], constant_scale=1.0), 6)
    out = prep.apply(np.full((7, 1, 1), 2000, dtype="int16"))
    np.testing.assert_allclose(out[:, 0, 0], [2.0] * 6)


@pytest.mark.parametrize(
    ("overrides", "num_bands", "field"),
    [
        ({"means": MEANS[:5]}, 6, "pretrained_cfg.data.init_args.means"),
        ({"stds": STDS + [1.0]}, 6, "pretrained_cfg.data.init_args.stds"),
        ({"stds": [0.0] * 6}, 6, "pretrained_cfg.data.init_args.stds"),
        ({"means": "stats/means.txt"}, 6, "pretrained_cfg.data.init_args.means"),
        ({"means": [[1.0, 2.0]] * 6}, 6, "pretrained_cfg.data.init_args.means"),
        ({}, 4, "pretrained_cfg.data.init_args.output_bands"),
        ({"output_bands": ["BLUE", "THERMAL"]}, 2, "pretrained_cfg.data.init_args.output_bands"),
        ({"dataset_bands": None}, 6, "pretrained_cfg.data.init_args.output_bands"),
        ({"output_bands": None}, 6, "pretrained_cfg.data.init_args.dataset_bands selects 7"),
        ({"predict_output_bands": ["BLUE"]}, 6, "pretrained_cfg.data.init_args.predict_output_bands"),
        ({"dataset_bands": [[0, 1, 2]]}, 6, "pretrained_cfg.data.init_args.dataset_bands"),
        ({"constant_scale": "0.0001"}, 6, "pretrained_cfg.data.init_args.constant_scale"),
        ({"test_transform": [{"class_path": "albumentations.Resize"}]}, 6, "init_args.test_transform"),
    ],
)
def test_config_errors_name_the_field(overrides, num_bands, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        preprocessing_from_config(generic_config(**overrides), num_bands)


def test_a_multi_temporal_datamodule_normalises_each_frame_like_a_single_image():
    """`expand_temporal_dimension` (one file of time x bands in training): served frames come as a
    list of files (io/pipeline.py), each normalised with the same per-band statistics."""
    temporal = preprocessing_from_config(generic_config(expand_temporal_dimension=True), 6)
    assert temporal == preprocessing_from_config(generic_config(), 6)


def test_sen1floods11_errors():
    bad = {"class_path": "Sen1Floods11NonGeoDataModule", "init_args": {"bands": ["BLUE", "NOPE"]}}
    with pytest.raises(ConfigError, match=r"init_args\.bands: \['NOPE'\]"):
        preprocessing_from_config(bad, 2)
    six = {"class_path": "Sen1Floods11NonGeoDataModule", "init_args": {"bands": SIX}}
    with pytest.raises(ConfigError, match=r"init_args\.bands selects 6 bands.*4 channels"):
        preprocessing_from_config(six, 4)


def test_predict_bands_override_dataset_bands():
    """Serving is TerraTorch's predict stage, which reads `predict_*_bands` when they are given."""
    prep = preprocessing_from_config(generic_config(predict_dataset_bands=SIX[::-1], predict_output_bands=SIX), 6)
    assert prep.band_indices == [5, 4, 3, 2, 1, 0]
    assert prep.expected_file_bands == 6


def test_malformed_sections():
    with pytest.raises(ConfigError, match=r"pretrained_cfg\.data: expected"):
        preprocessing_from_config(["GenericNonGeoSegmentationDataModule"], 6)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"pretrained_cfg\.data\.init_args: expected"):
        preprocessing_from_config({"class_path": "GenericNonGeoSegmentationDataModule", "init_args": [1]}, 6)


def test_unknown_datamodule_is_refused():
    with pytest.raises(ConfigError, match=r"pretrained_cfg\.data\.class_path: 'terratorch\.datamodules\.Fire"):
        preprocessing_from_config({"class_path": "terratorch.datamodules.FireScarsNonGeoDataModule"}, 6)


def test_wrong_band_count_message():
    prep = preprocessing_from_config(generic_config(), 6)
    with pytest.raises(InputError, match=r"the GeoTIFF has 4 bands; the model's datamodule expects 7 \(dataset_bands"):
        check_band_count(prep, 4)
    with pytest.raises(InputError, match="has 4 bands"):
        prep.apply(np.zeros((4, 2, 2), dtype="int16"))
    check_band_count(prep, 7)
    identity = preprocessing_from_config(None, 6)
    with pytest.raises(InputError, match=r"the GeoTIFF has 3 bands; the model expects 6"):
        check_band_count(identity, 3)
    check_band_count(Preprocessing(), 3)  # nothing known: anything goes


def test_band_layout_by_file_band_count():
    """Datamodule layout: selected by name; the model's band count: taken in model order; else refused."""
    sen1floods11 = preprocessing_from_config({"class_path": "Sen1Floods11NonGeoDataModule", "init_args": {"bands": SIX}}, 6)
    assert sen1floods11.for_file_bands(13, 6) is sen1floods11
    in_model_order = sen1floods11.for_file_bands(6, 6)
    assert in_model_order.band_indices is None and in_model_order.means == sen1floods11.means
    image = np.arange(6 * 4, dtype=np.int16).reshape(6, 2, 2) * 100
    thirteen = np.zeros((13, 2, 2), dtype=np.int16)
    thirteen[sen1floods11.band_indices] = image
    assert np.array_equal(in_model_order.apply(image), sen1floods11.apply(thirteen))  # same model input
    with pytest.raises(InputError, match=r"has 4 bands; this model takes 6 bands .* or 13 bands .*'indices'"):
        sen1floods11.for_file_bands(4, 6)
    identity = preprocessing_from_config(None, 6)
    assert identity.for_file_bands(6, 6) is identity
    with pytest.raises(InputError, match=r"has 7 bands; this model takes 6 bands \(the model's input bands, in model order\)\. For"):
        identity.for_file_bands(7, 6)
