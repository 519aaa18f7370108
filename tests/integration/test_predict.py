"""`vllm-terratorch predict` (issue #9): a folder of GeoTIFFs through one engine, checked against one
real `vllm serve` answering `/pooling` for each file; resume, bad inputs, Ctrl-C, and `--ray`.

Engines started: one server, one predict run (local), two Ray replicas; the re-runs load no model
(nothing left to infer) and the interruption test uses a stand-in engine.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from helpers import assert_masks_agree

from vllm_terratorch.testing.launcher import DOCUMENTED, Server
from vllm_terratorch.predict.args import add_predict_arguments, parse_engine_options
from vllm_terratorch.predict.engine import plugin_for_model
from vllm_terratorch.predict.inputs import list_inputs
from vllm_terratorch.predict.main import run_predict
from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("segmentation")
# Relative path -> (height, width): different sizes (one tile, several overlapping tiles, smaller
# than a tile), a nested sub-folder and a .tiff.
GOOD = {
    "a.tif": (64, 64),
    "b.tif": (100, 150),
    "c.tif": (64, 200),
    "d.tiff": (130, 90),
    "small.tif": (40, 50),
    "sub/e.tif": (80, 70),
    "sub/deeper/f.tif": (64, 64),
    "sub/g.tif": (150, 100),
}
BAD = {"corrupt.tif": "not a readable GeoTIFF", "four_bands.tif": "4 bands"}
TIMEOUT = 600


def predicted(relative: str) -> str:
    return str(Path(relative).with_name(Path(relative).stem + "_pred.tif"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    write_model_folder(root / "model", CFG)
    scenes = root / "scenes"
    for seed, (relative, (height, width)) in enumerate(GOOD.items()):
        (scenes / relative).parent.mkdir(parents=True, exist_ok=True)
        write_sample_geotiff(scenes / relative, height, width, seed=seed + 1, origin=(725000.0 + 1000 * seed, 4375000.0))
    write_sample_geotiff(scenes / "four_bands.tif", 64, 64, bands=4, seed=20)
    (scenes / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(2000))
    (scenes / "notes.txt").write_text("not an input")
    return root


@pytest.fixture(scope="module")
def starting_server(workdir):
    """`vllm serve` (documented flags, float32 like the predict runs), loading while predict runs."""
    args = [*DOCUMENTED, "--dtype", "float32", "--allowed-local-media-path", str(workdir / "scenes")]
    server = Server(workdir / "model", args, workdir / "server.log")
    try:
        yield server
    finally:
        server.close()


def predict_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vllm_terratorch.predict.main", *args, "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def local_run(workdir, starting_server):
    out = workdir / "out"
    # Small engine batches and chunks, so that tiles of different scenes share batches and calls; the
    # four scenes over 10000 pixels are streamed (read, inferred and written window by window, #18)
    # between the others, and must still equal the server's in-memory answers.
    result = predict_cli(str(workdir / "model"), "--input", str(workdir / "scenes"), "--output", str(out),
                         "--dtype", "float32", "--max-num-seqs", "8", "--chunk-tiles", "12", "--workers", "2",
                         "--stream-pixels", "10000")
    return out, result


def read_mask(source) -> tuple[np.ndarray, object, object, float | None]:
    with rasterio.open(source) as dataset:
        return dataset.read(), dataset.crs, dataset.transform, dataset.nodata


def test_outputs_equal_the_servers_answers(workdir, local_run, starting_server):
    out, result = local_run
    assert result.returncode == 1, result.stderr[-3000:]  # two bad inputs
    starting_server.wait_ready()
    classes = []
    for relative in GOOD:
        mask, crs, transform, nodata = read_mask(out / predicted(relative))
        with rasterio.open(workdir / "scenes" / relative) as source:
            assert (crs, transform) == (source.crs, source.transform), relative
            assert mask.shape == (1, source.height, source.width), relative
        response = starting_server.pooling(
            {"data": str(workdir / "scenes" / relative), "data_format": "path", "out_data_format": "b64_json"}
        )
        assert response.status_code == 200, response.text
        served, *_ = read_mask(io.BytesIO(base64.b64decode(response.json()["data"]["data"])))
        assert mask.dtype == np.uint8 and nodata == 255
        assert_masks_agree(mask, served, relative)
        classes.append(set(np.unique(mask).tolist()))
    # Real predictions, not a constant: some scene has structure, and the scenes together use more
    # than one class (a random model may well give a small scene one class).
    assert any(len(found) > 1 for found in classes) and len(set().union(*classes)) > 1, classes


def test_summary_and_bad_inputs(workdir, local_run):
    out, result = local_run
    summary = json.loads((out / "summary.json").read_text())
    by_input = {Path(entry["input"]).relative_to(workdir / "scenes").as_posix(): entry for entry in summary["inputs"]}
    assert set(by_input) == set(GOOD) | set(BAD)  # notes.txt is not an input
    for relative in GOOD:
        entry = by_input[relative]
        assert entry["status"] == "ok" and entry["error"] is None and entry["seconds"] > 0, entry
        assert entry["output"] == str(out / predicted(relative))
    for relative, message in BAD.items():
        entry = by_input[relative]
        assert entry["status"] == "failed" and message in entry["error"], entry
        assert f"{relative}: " in result.stderr and message in result.stderr
        assert not (out / predicted(relative)).exists()
    totals = summary["totals"]
    assert (totals["ok"], totals["failed"], totals["skipped"]) == (len(GOOD), len(BAD), 0)
    assert totals["tiles"] == sum(entry["tiles"] for entry in summary["inputs"] if entry["status"] == "ok")
    assert 0 < totals["engine_busy_fraction"] <= 1 and totals["engine_calls"] >= 2
    assert "engine busy" in result.stdout
    assert not list(out.rglob("*.partial"))


def test_rerun_skips_what_is_done(workdir, local_run):
    out, _ = local_run
    before = {relative: (out / predicted(relative)).stat().st_mtime_ns for relative in GOOD}
    result = predict_cli(str(workdir / "model"), "--input", str(workdir / "scenes"), "--output", str(out), "--dtype", "float32")
    assert result.returncode == 1, result.stderr[-3000:]  # the bad inputs are tried again, and fail again
    assert "starting the engine" not in result.stderr  # nothing left to infer: no model loaded
    assert f"{len(GOOD)} of {len(GOOD) + len(BAD)} inputs already have a complete output" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["totals"]["skipped"], summary["totals"]["failed"], summary["totals"]["ok"]) == (len(GOOD), len(BAD), 0)
    assert {relative: (out / predicted(relative)).stat().st_mtime_ns for relative in GOOD} == before


def test_ray_replicas_give_identical_outputs(workdir, local_run):
    out, _ = local_run
    ray_out = workdir / "out-ray"
    result = predict_cli(str(workdir / "model"), "--input", str(workdir / "scenes"), "--output", str(ray_out),
                         "--dtype", "float32", "--ray", "--replicas", "2", "--workers", "2", "--chunk-tiles", "12")
    assert result.returncode == 1, result.stderr[-5000:]
    summary = json.loads((ray_out / "summary.json").read_text())
    assert summary["mode"] == "ray" and summary["replicas"] == 2
    assert (summary["totals"]["ok"], summary["totals"]["failed"]) == (len(GOOD), len(BAD))
    for relative in GOOD:
        local, *local_georef = read_mask(out / predicted(relative))
        remote, *remote_georef = read_mask(ray_out / predicted(relative))
        assert local_georef == remote_georef, relative
        assert_masks_agree(local, remote, relative)
    for relative, message in BAD.items():
        assert message in next(e["error"] for e in summary["inputs"] if e["input"].endswith(relative))


# Without an engine -------------------------------------------------------------------------------


class StandInEngine:
    """What predict uses of `LLM`: the engine's config and `encode`; optionally Ctrl-C on call N."""

    def __init__(self, model_dir: Path, interrupt_on_call: int | None = None, nan_on_call: int | None = None) -> None:
        model_config = SimpleNamespace(model=str(model_dir), dtype=torch.float32)
        scheduler_config = SimpleNamespace(max_num_seqs=2)
        self.llm_engine = SimpleNamespace(vllm_config=SimpleNamespace(model_config=model_config, scheduler_config=scheduler_config))
        self.interrupt_on_call = interrupt_on_call
        self.nan_on_call = nan_on_call  # a failed forward: vLLM gives that batch NaN outputs
        self.nan_prompts = 0
        self.calls = 0
        self.encoded = 0  # prompts of the calls that returned

    def encode(self, prompts, pooling_task, use_tqdm):
        assert pooling_task == "plugin" and not use_tqdm
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        outputs = []
        for prompt in prompts:
            band = prompt["multi_modal_data"]["image"]["pixel_values"][0]
            logits = torch.stack([band, -band])
            if self.calls == self.nan_on_call:
                logits = torch.full_like(logits, float("nan"))
            outputs.append(SimpleNamespace(outputs=SimpleNamespace(data=logits)))
        self.nan_prompts += len(prompts) if self.calls == self.nan_on_call else 0
        self.encoded += len(prompts)
        return outputs


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    args.engine_options = unknown
    return args


def test_ctrl_c_keeps_only_complete_outputs_and_resumes(tmp_path, capsys):
    model = write_model_folder(tmp_path / "model", CFG)
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for index in range(8):
        write_sample_geotiff(scenes / f"s{index}.tif", 64, 64, seed=index)
    (scenes / "corrupt.tif").write_bytes(b"garbage")
    out = scenes / "predictions"  # inside the input folder: outputs must not become inputs
    argv = [str(model), "--input", str(scenes), "--output", str(out), "--chunk-tiles", "2", "--workers", "1", "--no-progress"]
    engine = StandInEngine(model, interrupt_on_call=3)
    assert run_predict(parse(argv), llm=engine) == 130
    summary = json.loads((out / "summary.json").read_text())
    statuses = {Path(e["input"]).name: e["status"] for e in summary["inputs"]}
    done = sorted(name for name, status in statuses.items() if status == "ok")
    # Every scene of the two calls that returned was written whole; nothing else was.
    assert summary["interrupted"] and len(done) == engine.encoded >= 2
    assert {status for status in statuses.values()} <= {"ok", "failed", "interrupted"}
    assert sorted(p.name for p in out.glob("*_pred.tif")) == sorted(name.replace(".tif", "_pred.tif") for name in done)
    for path in out.glob("*_pred.tif"):
        assert read_mask(path)[0].shape == (1, 64, 64)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    capsys.readouterr()

    # Resume; the first engine call's forward fails (NaN outputs): those scenes fail, as the
    # server answers 400 for them, and the rest of the run goes on.
    engine = StandInEngine(model, nan_on_call=1)
    assert run_predict(parse(argv), llm=engine) == 1
    summary = json.loads((out / "summary.json").read_text())
    entries = {Path(e["input"]).name: e for e in summary["inputs"]}
    statuses = {name: entry["status"] for name, entry in entries.items()}
    assert sorted(name for name, status in statuses.items() if status == "skipped") == done
    no_output = [name for name, e in entries.items() if e["status"] == "failed" and "no valid output" in (e["error"] or "")]
    assert len(no_output) == engine.nan_prompts >= 1
    assert sum(status == "ok" for status in statuses.values()) == 8 - len(done) - len(no_output)
    assert not any((out / name.replace(".tif", "_pred.tif")).exists() for name in no_output)
    assert statuses["corrupt.tif"] == "failed" and len(statuses) == 9
    assert "corrupt.tif: the input is not a readable GeoTIFF" in capsys.readouterr().err

    assert run_predict(parse([*argv, "--overwrite"]), llm=StandInEngine(model)) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["ok"] == 8 and summary["totals"]["skipped"] == 0


def test_a_streamed_scene_is_written_whole_or_not_at_all(tmp_path):
    """Scenes over --stream-pixels (#18): the outputs of scenes held whole; Ctrl-C or a failed
    forward in the middle of one leaves no file of it, and the other scenes go on."""
    model = write_model_folder(tmp_path / "model", CFG)
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for index in range(3):
        write_sample_geotiff(scenes / f"s{index}.tif", 200, 190, seed=index)  # 5 x 4 tiles each (TerraTorch's tiling)
    base = [str(model), "--input", str(scenes), "--chunk-tiles", "4", "--workers", "1", "--no-progress"]

    def run(name: str, engine: StandInEngine, *options: str) -> tuple[int, Path]:
        return run_predict(parse([*base, "--output", str(tmp_path / name), *options]), llm=engine), tmp_path / name

    assert run("whole", StandInEngine(model), "--stream-pixels", "0")[0] == 0
    code, streamed = run("streamed", StandInEngine(model), "--stream-pixels", "1000")
    assert code == 0
    for index in range(3):
        assert np.array_equal(read_mask(streamed / f"s{index}_pred.tif")[0], read_mask(tmp_path / "whole" / f"s{index}_pred.tif")[0])
    assert json.loads((streamed / "summary.json").read_text())["totals"]["tiles"] == 60
    code, cog = run("cog", StandInEngine(model), "--cog")  # --cog streams every scene, whatever its size
    assert code == 0
    for index in range(3):
        with rasterio.open(cog / f"s{index}_pred.tif") as source:
            assert source.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert np.array_equal(read_mask(cog / f"s{index}_pred.tif")[0], read_mask(streamed / f"s{index}_pred.tif")[0])

    # Ctrl-C in the engine's 6th call: the first scene (calls 1-4) is complete, the second is not.
    code, out = run("interrupted", StandInEngine(model, interrupt_on_call=6), "--stream-pixels", "1000")
    assert code == 130
    statuses = {Path(e["input"]).name: e["status"] for e in json.loads((out / "summary.json").read_text())["inputs"]}
    assert statuses == {"s0.tif": "ok", "s1.tif": "interrupted", "s2.tif": "interrupted"}
    assert sorted(p.name for p in out.iterdir()) == ["s0_pred.tif", "summary.json"]  # no temp file either

    # A failed forward (NaN outputs) in the second call: that scene fails with no output, the rest is written.
    code, out = run("nan", StandInEngine(model, nan_on_call=2), "--stream-pixels", "1000")
    assert code == 1
    entries = {Path(e["input"]).name: e for e in json.loads((out / "summary.json").read_text())["inputs"]}
    assert entries["s0.tif"]["status"] == "failed" and "no valid output" in entries["s0.tif"]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["s1_pred.tif", "s2_pred.tif", "summary.json"]


def test_inputs_from_glob_and_list(tmp_path):
    for relative in ("x/a.tif", "x/y/b.TIFF", "x/c.txt", "z/d.tif"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    out = tmp_path / "out"
    assert [str(r) for _, r in list_inputs(str(tmp_path / "x"), out)] == ["a.tif", "y/b.TIFF"]
    assert [str(r) for _, r in list_inputs(str(tmp_path / "*" / "*.tif"), out)] == ["x/a.tif", "z/d.tif"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# scenes\nx/y/b.TIFF\n{tmp_path / 'z' / 'd.tif'}\n\n")
    assert [str(r) for _, r in list_inputs(str(listing), out)] == ["x/y/b.TIFF", "z/d.tif"]


def test_engine_options_and_task_plugins(tmp_path):
    assert parse_engine_options(["--max-model-len", "1024", "--enable-prefix-caching", "--swap-space=1.5",
                                 "--no-enable-chunked-prefill", "--kv-cache-dtype", "auto", "--seed", "-1"]) == {
        "max_model_len": 1024, "enable_prefix_caching": True, "swap_space": 1.5,
        "enable_chunked_prefill": False, "kv_cache_dtype": "auto", "seed": -1,
    }
    for task, plugin in (("segmentation", "terratorch_segmentation"), ("regression", "terratorch_regression"),
                         ("classification", "terratorch_classification")):
        folder = tmp_path / task
        folder.mkdir()
        config = {"architectures": ["Terratorch"], "num_classes": 0, "pretrained_cfg": sample_pretrained_cfg(task)}
        (folder / "config.json").write_text(json.dumps(config))
        assert plugin_for_model(folder) == plugin
    args = parse([str(tmp_path / "segmentation"), "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--max-modle-len", "9"])
    assert run_predict(args) == 2  # a typo is a usage error, before anything runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scenes_prepared_ahead_equal_prepare_at_the_engine_dtype(tmp_path, dtype):
    """Workers prepare at float64 before the engine's dtype is known; cast then, the engine gets
    exactly the tensors the IO processor's `prepare` makes at that dtype (as the server does)."""
    from vllm_terratorch.io.schema import GeoTiffRequest
    from vllm_terratorch.predict.tasks import ProcessorSpec, build_prompts, decode_scene, get_pipeline

    model = write_model_folder(tmp_path / "model", CFG)
    scene = write_sample_geotiff(tmp_path / "scene.tif", 100, 130, seed=3)
    decoded = decode_scene(ProcessorSpec(str(model), "terratorch_segmentation", "float64"), 0, str(scene))
    ours = build_prompts(decoded, dtype)
    pipeline = get_pipeline(ProcessorSpec(str(model), "terratorch_segmentation", str(dtype).removeprefix("torch.")))
    request = GeoTiffRequest(data=str(scene), data_format="path", out_data_format="path")
    reference, _ = pipeline.prepare(scene.read_bytes(), request)
    assert len(ours) == len(reference) == 9  # 3 x 3 overlapping tiles
    for got, expected in zip(ours, reference):
        got, expected = got["multi_modal_data"]["image"], expected["multi_modal_data"]["image"]
        assert set(got) == set(expected) == {"pixel_values", "location_coords"}
        for name in got:
            assert got[name].dtype == expected[name].dtype == dtype and torch.equal(got[name], expected[name]), name
