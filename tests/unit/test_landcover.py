"""The demo's synthetic scenes: structured, georeferenced, labelled by the NDWI rule, and read by
TerraTorch's generic segmentation datamodule as the demo's YAML configures it."""

from __future__ import annotations

import numpy as np
import rasterio

from vllm_terratorch.testing.landcover import BANDS, band_statistics, land_cover, ndwi_water, write_scene, write_scene_set


def test_scenes_have_every_cover_and_a_rule_label_that_follows_the_water(tmp_path):
    cover = land_cover(128, seed=3)
    assert set(np.unique(cover)) == {0, 1, 2, 3}
    path, label = write_scene(tmp_path / "s_img.tif", 128, 3, tmp_path / "s_mask.tif")
    with rasterio.open(path) as scene, rasterio.open(tmp_path / "s_mask.tif") as mask:
        assert scene.count == len(BANDS) and scene.dtypes[0] == "int16" and scene.crs.to_epsg() == 32630
        assert (mask.crs, mask.transform) == (scene.crs, scene.transform)
        assert np.array_equal(mask.read(1), label)
        pixels = scene.read()
    assert np.array_equal(ndwi_water(pixels), label)
    assert ((cover == 1) == (label == 1)).mean() > 0.95  # the rule finds the water (shores are mixed pixels)


def test_the_demo_yaml_datamodule_reads_the_scene_set(tmp_path):
    import yaml
    from terratorch.datamodules import GenericNonGeoSegmentationDataModule

    from vllm_terratorch.testing.demo import YAML

    written = write_scene_set(tmp_path, 64, train=3, val=1)
    args = yaml.safe_load(YAML.read_text())["data"]["init_args"]
    args = {k: v for k, v in args.items() if not k.endswith("_transform")} | {
        "batch_size": 2, "train_data_root": str(tmp_path / "train"), "val_data_root": str(tmp_path / "val"), "test_data_root": str(tmp_path / "val")}
    datamodule = GenericNonGeoSegmentationDataModule(**args)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[1:] == (6, 64, 64) and set(np.unique(batch["mask"].numpy())) <= {0, 1}
    means, stds = band_statistics(written["train"])
    assert len(means) == len(stds) == 6 and all(s > 0 for s in stds)
