"""A multi-modal TerraMind model served from files through `terratorch_tm_segmentation` (TerraTorch's
TerraMind processor name): one GeoTIFF per modality, as `{modality: input}` or as upstream's folder
of modality folders. Every answer equals TerraTorch's own predict pipeline (its datamodule on the
request's files) and a plain PyTorch forward; bad requests are 400s and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import rasterio
import torch

from helpers import assert_masks_agree
from reference import assert_same_classes, terratorch_predict_inputs

from vllm_terratorch.testing.launcher import Server
from vllm_terratorch.testing.samples import build_sample_task, sample_terramind_cfg, write_model_folder, write_sample_geotiff

pytestmark = pytest.mark.integration
MODALITIES = ("S2L2A", "S1RTC", "DEM")
BANDS = {"S2L2A": 12, "S1RTC": 2, "DEM": 1}
CFG = sample_terramind_cfg(MODALITIES)
SCENES = 6
ARGS = ["--io-processor-plugin", "terratorch_tm_segmentation", "--model-impl", "terratorch", "--skip-tokenizer-init",
        "--enforce-eager"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multimodal")
    write_model_folder(root / "model", CFG)
    for k in range(SCENES):  # upstream's layout: scene/<modality>/<file>
        for m, name in enumerate(MODALITIES):
            (root / "media" / f"scene{k}" / name).mkdir(parents=True)
            write_sample_geotiff(root / "media" / f"scene{k}" / name / f"tile{k}_{name}.tif", 64, 64, bands=BANDS[name],
                                 seed=10 * k + m)
    for name in MODALITIES:  # a larger scene: several tiles, blended
        write_sample_geotiff(root / "media" / f"big_{name}.tif", 100, 90, bands=BANDS[name], seed=99)
    write_sample_geotiff(root / "media" / "shifted_S1RTC.tif", 64, 64, bands=2, origin=(725300.0, 4375000.0))
    (root / "out").mkdir()
    return root


@pytest.fixture(scope="module")
def server(workdir):
    media = workdir / "media"
    env = {"VLLM_TERRATORCH_IO_CONFIG": json.dumps({"output_path": str(workdir / "out")})}
    server = Server(workdir / "model", [*ARGS, "--allowed-local-media-path", str(media)], workdir / "server.log", env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def files_of(workdir, k: int) -> dict[str, str]:
    return {name: str(workdir / "media" / f"scene{k}" / name / f"tile{k}_{name}.tif") for name in MODALITIES}


def reference_logits(workdir, k: int) -> np.ndarray:
    """TerraTorch's datamodule on the scene's folder, then the network on the dict of modalities."""
    inputs = terratorch_predict_inputs(CFG["data"], {name: str(workdir / "media" / f"scene{k}" / name) for name in MODALITIES})
    network = build_sample_task(CFG).model
    with torch.no_grad():
        return network({name: inputs[name] for name in MODALITIES}).output[0].numpy()


def mask(response) -> tuple[np.ndarray, dict]:
    assert response.status_code == 200, response.text
    with rasterio.open(io.BytesIO(base64.b64decode(response.json()["data"]["data"]))) as source:
        return source.read(1), {"crs": source.crs, "transform": source.transform}


def test_concurrent_scenes_in_every_request_form_equal_terratorchs_own_pipeline(server, workdir):
    def ask(k: int):
        files = files_of(workdir, k)
        if k % 3 == 0:  # the object form, inline
            data = {"data": {name: base64.b64encode(open(path, "rb").read()).decode() for name, path in files.items()},
                    "data_format": "b64_json"}
        elif k % 3 == 1:  # the object form, paths, modalities in any order
            data = {"data": dict(reversed(files.items())), "data_format": "path"}
        else:  # upstream's folder form
            data = {"data": str(workdir / "media" / f"scene{k}"), "data_format": "path"}
        return server.pooling(data | {"out_data_format": "b64_json", "image_format": "tiff"})

    with ThreadPoolExecutor(SCENES) as pool:
        responses = list(pool.map(ask, range(SCENES)))
    answers = [mask(response)[0] for response in responses]
    for k, answer in enumerate(answers):
        assert answer.shape == (64, 64)
        assert_same_classes(answer, reference_logits(workdir, k))
    assert any(not np.array_equal(answers[0], other) for other in answers[1:])


def test_a_larger_scene_is_tiled_across_modalities_and_written_georeferenced(server, workdir):
    data = {name: str(workdir / "media" / f"big_{name}.tif") for name in MODALITIES}
    response = server.pooling({"data": data, "data_format": "path", "out_data_format": "path", "out_path": "big.tif"})
    assert response.status_code == 200, response.text
    written = response.json()["data"]["data"]
    with rasterio.open(written) as out, rasterio.open(data["S2L2A"]) as source:
        assert (out.height, out.width) == (100, 90)
        assert out.crs == source.crs and out.transform == source.transform
        assert len(np.unique(out.read(1))) > 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda w: {"data": {"S2L2A": files_of(w, 0)["S2L2A"], "S1RTC": files_of(w, 0)["S1RTC"]}}, "missing ['DEM']"),
        (lambda w: {"data": files_of(w, 0) | {"S1GRD": files_of(w, 0)["S1RTC"]}}, "unknown ['S1GRD']"),
        (lambda w: {"data": list(files_of(w, 0).values())}, "one input per modality"),
        (lambda w: {"data": files_of(w, 0) | {"S1RTC": str(w / "media" / "shifted_S1RTC.tif")}},
         "S1RTC is not on S2L2A's grid"),
        (lambda w: {"data": str(w / "media")}, "S2L2A/: no such sub-folder"),
        (lambda w: {"data": files_of(w, 0) | {"DEM": files_of(w, 0)["S1RTC"]}}, "read the input DEM as [2]"),
    ],
    ids=["missing", "unknown", "list", "other-grid", "not-a-scene-folder", "wrong-bands"],
)
def test_bad_multimodal_requests_are_rejected_and_the_server_keeps_serving(server, workdir, data, message):
    response = server.pooling(data(workdir) | {"data_format": "path", "out_data_format": "b64_json"})
    assert response.status_code == 400, response.text
    assert message in json.dumps(response.json())
    good = server.pooling({"data": files_of(workdir, 1), "data_format": "path", "out_data_format": "b64_json"})
    assert_same_classes(mask(good)[0], reference_logits(workdir, 1))


def test_predict_reads_scene_folders_and_equals_the_server(server, workdir):
    """`vllm-terratorch predict` on a folder of scene folders (the modality layout, detected from the
    model): one mask per scene, equal to the server's answer for the same folder."""
    out = workdir / "predicted"
    command = [sys.executable, "-m", "vllm_terratorch.predict.main", str(workdir / "model"), "--input",
               str(workdir / "media"), "--output", str(out), "--dtype", "float32", "--workers", "2", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["inputs"] == summary["totals"]["ok"] == SCENES, summary["totals"]
    for k in range(SCENES):
        served = server.pooling({"data": str(workdir / "media" / f"scene{k}"), "data_format": "path", "out_data_format": "b64_json"})
        with rasterio.open(out / f"scene{k}_pred.tif") as predicted:
            assert_masks_agree(predicted.read(1), mask(served)[0], k)


def test_offline_encode_through_the_tm_processor_equals_the_server(server, workdir):
    """`LLM.encode` with `io_processor_plugin="terratorch_tm_segmentation"`: the same answer."""
    from helpers import engine

    inline = {name: base64.b64encode(open(path, "rb").read()).decode() for name, path in files_of(workdir, 4).items()}
    with engine(workdir / "model", io_processor_plugin="terratorch_tm_segmentation") as llm:
        data = {"data": inline, "data_format": "b64_json", "out_data_format": "b64_json"}
        output = llm.encode({"data": data}, pooling_task="plugin", use_tqdm=False)[0].outputs
    with rasterio.open(io.BytesIO(base64.b64decode(output.data))) as source:
        offline = source.read(1)
    served = server.pooling({"data": files_of(workdir, 4), "data_format": "path", "out_data_format": "b64_json"})
    assert_masks_agree(offline, mask(served)[0])
    assert_same_classes(offline, reference_logits(workdir, 4))
