"""`predict`'s scene layouts: a scene is a GeoTIFF, a folder of time steps, or a folder of modality
folders; the model's input spec picks the layout, and each scene becomes the `/pooling` request
the server would get for it (same files, same order)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_terratorch.errors import RequestError, UsageError
from vllm_terratorch.predict.inputs import list_scene_folders, prepare_items, scene_layout
from vllm_terratorch.predict.tasks import ProcessorSpec, decode_scene, from_wire, get_pipeline, scene_request
from vllm_terratorch.testing.samples import (
    sample_pretrained_cfg,
    sample_terramind_cfg,
    write_model_folder,
    write_sample_geotiff,
)

MODALITIES = ["S2L2A", "S1RTC"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene-models")
    return {
        "file": write_model_folder(root / "plain", sample_pretrained_cfg("segmentation")),
        "frames": write_model_folder(root / "frames", sample_pretrained_cfg("regression", frames=3)),
        "modalities": write_model_folder(root / "tm", sample_terramind_cfg(tuple(MODALITIES))),
    }


def scene_folder(root: Path, name: str) -> Path:
    for seed, (modality, bands) in enumerate({"S2L2A": 12, "S1RTC": 2}.items()):
        (root / name / modality).mkdir(parents=True)
        write_sample_geotiff(root / name / modality / f"{name}_{modality}.tif", 64, 64, bands=bands, seed=seed)
    return root / name


@pytest.mark.parametrize("layout", ["file", "frames", "modalities"])
def test_the_model_picks_the_scene_layout(models, layout):
    assert scene_layout(models[layout]) == (layout, MODALITIES if layout == "modalities" else [
        "pixel_values" if layout == "file" else "x"])
    assert scene_layout(models["frames"], "file")[0] == "file"  # a stacked time series, one file per scene
    with pytest.raises(UsageError, match="not one per modality"):
        scene_layout(models["file"], "modalities")


def test_scene_folders_are_found_anywhere_under_the_input_and_named_after_the_folder(tmp_path):
    scene_folder(tmp_path / "in", "a")
    scene_folder(tmp_path / "in" / "region", "b")
    (tmp_path / "in" / "notes").mkdir()
    out = tmp_path / "out"
    found = list_scene_folders(str(tmp_path / "in"), out, "modalities", MODALITIES)
    assert [str(relative) for _, relative in found] == ["a", "region/b"]
    items = prepare_items(str(tmp_path / "in"), out, "terratorch_segmentation", "modalities", MODALITIES)
    assert [item.output for item in items] == [out / "a_pred.tif", out / "region" / "b_pred.tif"]
    alone = list_scene_folders(str(tmp_path / "in" / "a"), out, "modalities", MODALITIES)
    assert [str(relative) for _, relative in alone] == ["a"]  # the input is itself one scene
    with pytest.raises(UsageError, match="give a folder of scene folders"):
        list_scene_folders(str(tmp_path / "in" / "a" / "S2L2A" / "a_S2L2A.tif"), out, "modalities", MODALITIES)


def test_frame_folders_are_scenes_with_their_files_in_name_order(tmp_path, models):
    (tmp_path / "series").mkdir()
    for t, day in enumerate(["2024-06-01", "2024-03-01", "2024-09-01"]):
        write_sample_geotiff(tmp_path / "series" / f"s2_{day}.tif", 64, 64, seed=t)
    (found,) = list_scene_folders(str(tmp_path), tmp_path / "out", "frames", [])
    assert found[0] == tmp_path / "series"
    spec = ProcessorSpec(str(models["frames"]), "terratorch_regression", "float32")
    request, files = scene_request(get_pipeline(spec), str(found[0]), None)
    assert [file.name for file in files] == ["s2_2024-03-01.tif", "s2_2024-06-01.tif", "s2_2024-09-01.tif"]
    decoded = decode_scene(spec, 0, str(found[0]))
    assert decoded["ok"], decoded
    assert from_wire(decoded["tiles"]["x"]).shape == (1, 6, 3, 64, 64)
    assert from_wire(decoded["extras"]["temporal_coords"]).reshape(-1).tolist() == [2024, 60, 2024, 152, 2024, 244]


def test_a_modality_scene_decodes_to_one_tile_tensor_per_modality(tmp_path, models):
    spec = ProcessorSpec(str(models["modalities"]), "terratorch_tm_segmentation", "float32")
    folder = scene_folder(tmp_path, "scene")
    request, files = scene_request(get_pipeline(spec), str(folder), None)
    assert request.modalities == {name: str(folder / name / f"scene_{name}.tif") for name in MODALITIES}
    decoded = decode_scene(spec, 0, str(folder))
    assert decoded["ok"], decoded
    assert {name: from_wire(wire).shape for name, wire in decoded["tiles"].items()} == {
        "S2L2A": (1, 12, 64, 64), "S1RTC": (1, 2, 64, 64)}
    (folder / "S1RTC" / "scene_S1RTC.tif").unlink()
    failed = decode_scene(spec, 1, str(folder))
    assert not failed["ok"] and "S1RTC/: 0 files" in failed["error"]
    with pytest.raises(RequestError, match="S1RTC/: 0 files"):
        scene_request(get_pipeline(spec), str(folder), None)
