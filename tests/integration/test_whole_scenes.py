"""A whole scene far larger than memory would allow held whole, through `vllm-terratorch predict` (#18).

A 10000 x 10000 x 6 int16 scene (1.2 GB on disk, 2.4 GB as float32, ~20 GB the way the in-memory
path held it) is generated block by block into the test's tmp dir. `predict` (a real engine, a tiny
Prithvi + UperNet with 512^2 tiles, coarse so that CI's two cores get through 400 tiles) must run
it with a process-tree peak RSS less than 800 MiB above the same command on a 1024^2 crop of it,
and give the crop's (in-memory) answer on that window. Also: a killed `predict` leaves no worker;
and a server (`vllm serve`, max_pixels 2 M) answers a 3000 x 3000 `path` request by streaming it
to a `path` output, while what it cannot stream keeps its 4xx.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio
import requests
from rasterio.windows import Window

from vllm_terratorch.testing.launcher import DOCUMENTED, Server
from vllm_terratorch.testing.samples import write_model_folder, write_sample_geotiff
from vllm_terratorch.testing.scenes import coarse_tile_cfg, run_measured, write_large_scene

pytestmark = pytest.mark.integration
SIZE, CROP, TILE = 10_000, 1024, 512
SERVED, SERVER_MAX_PIXELS = 3000, 2_000_000
MiB = 1024**2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole-scenes")
    write_model_folder(root / "model", coarse_tile_cfg(TILE), seed=4)  # a seed whose random model predicts both classes here
    pattern_file = write_sample_geotiff(root / "pattern.tif", 1000, 1000, seed=5)
    with rasterio.open(pattern_file) as source:
        pattern = source.read()
    for name, size in (("big", SIZE), ("crop", CROP)):
        (root / name).mkdir()
        write_large_scene(root / name / f"{name}.tif", size, pattern)
    yield root
    (root / "big" / "big.tif").unlink(missing_ok=True)


def predict_command(workdir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "vllm_terratorch.predict.main", str(workdir / "model"), "--input", str(workdir / name),
            "--output", str(workdir / f"out-{name}"), "--dtype", "float32", "--no-progress"]


def test_a_scene_larger_than_memory_allows_predicts_in_flat_memory(workdir):
    code, small_peak = run_measured(predict_command(workdir, "crop"), workdir / "crop.log")
    assert code == 0, (workdir / "crop.log").read_text()[-3000:]
    code, big_peak = run_measured(predict_command(workdir, "big"), workdir / "big.log")
    assert code == 0, (workdir / "big.log").read_text()[-3000:]
    grown = (big_peak - small_peak) / MiB
    assert grown < 800, f"peak RSS {big_peak / MiB:.0f} MiB for {SIZE}^2 vs {small_peak / MiB:.0f} MiB for {CROP}^2"

    summary = json.loads((workdir / "out-big" / "summary.json").read_text())
    assert summary["totals"]["ok"] == 1 and summary["inputs"][0]["tiles"] == (-(-SIZE // TILE)) ** 2
    assert summary["totals"]["peak_rss_bytes"] >= 0.5 * big_peak  # the summary reports the run's memory too
    with rasterio.open(workdir / "out-big" / "big_pred.tif") as big, rasterio.open(workdir / "out-crop" / "crop_pred.tif") as crop:
        assert (big.width, big.height, big.crs, big.transform) == (SIZE, SIZE, crop.crs, crop.transform)
        assert big.profile["tiled"] and big.nodata == 255
        window = big.read(window=Window(0, 0, CROP, CROP))
        expected = crop.read()
        # The crop's tiles are the big scene's first tiles (no overlap, 1024 = 2 tiles): the same
        # inputs, in engine batches of other sizes.
        assert float((window == expected).mean()) >= 0.999
        assert len(np.unique(expected)) > 1 and (expected == 255).any()  # real predictions, nodata kept
        last = big.read(window=Window(SIZE - 300, SIZE - 300, 300, 300))  # the padded edge tiles
        assert len(np.unique(last)) > 1
    assert not list((workdir / "out-big").glob(".*"))  # no temporary file left


def test_a_killed_predict_leaves_no_worker_behind(workdir):
    command = predict_command(workdir, "crop")
    command[command.index("--output") + 1] = str(workdir / "out-killed")
    child = subprocess.Popen([*command, "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = psutil.Process(child.pid)
    deadline = time.monotonic() + 120
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = [p for p in process.children(recursive=True) if "multiprocessing" in " ".join(p.cmdline())]
        time.sleep(0.2)
    assert len(workers) >= 2, "predict started no decode workers"
    time.sleep(2)  # the workers are up (initialised) while the engine loads
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"workers outlived their killed parent: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def server(workdir):
    media, outputs = workdir / "media", workdir / "served"
    media.mkdir()
    outputs.mkdir()
    with rasterio.open(workdir / "pattern.tif") as source:
        pattern = source.read()
    write_large_scene(media / "scene.tif", SERVED, pattern)  # 9 M pixels: over max_pixels
    write_large_scene(media / "crop.tif", CROP, pattern)  # 1 M pixels: held whole
    os.link(workdir / "big" / "big.tif", media / "big.tif")  # 400 tiles: long enough to leave in the middle
    settings = {"output_path": str(outputs), "max_pixels": SERVER_MAX_PIXELS}
    server = Server(workdir / "model", [*DOCUMENTED, "--allowed-local-media-path", str(media)], workdir / "server.log",
                    {"VLLM_TERRATORCH_IO_CONFIG": json.dumps(settings)})
    try:
        server.wait_ready()
        yield server, media, outputs
    finally:
        server.close()
        (media / "big.tif").unlink()


def path_request(path: Path, **extra: object) -> dict[str, object]:
    return {"data": str(path), "data_format": "path", "out_data_format": "path", **extra}


def test_a_path_request_beyond_max_pixels_is_streamed_to_a_path_output(server):
    server, media, outputs = server
    response = server.pooling(path_request(media / "scene.tif", out_path="scene_pred.tif"), timeout=600)
    assert response.status_code == 200, response.text
    answer = response.json()["data"]
    assert answer["data_format"] == "path" and Path(answer["data"]) == outputs / "scene_pred.tif"
    crop = server.pooling(path_request(media / "crop.tif", out_path="crop_pred.tif"), timeout=600)
    assert crop.status_code == 200, crop.text
    with rasterio.open(answer["data"]) as big, rasterio.open(media / "scene.tif") as source, \
            rasterio.open(crop.json()["data"]["data"]) as held:
        assert (big.width, big.height, big.crs, big.transform) == (SERVED, SERVED, source.crs, source.transform)
        assert big.profile["tiled"] and big.nodata == 255
        window, expected = big.read(window=Window(0, 0, CROP, CROP)), held.read()
        # The same first tiles as the crop held whole (no overlap), in other engine batches.
        assert float((window == expected).mean()) >= 0.999
        assert len(np.unique(expected)) > 1 and (expected == 255).any()
        assert len(np.unique(big.read(window=Window(SERVED - 300, SERVED - 300, 300, 300)))) > 1  # padded edges
    assert sorted(p.name for p in outputs.iterdir()) == ["crop_pred.tif", "scene_pred.tif"]  # no temporary file


def test_what_cannot_be_streamed_keeps_its_4xx_and_a_client_that_leaves_leaves_no_file(server):
    server, media, outputs = server
    before = sorted(p.name for p in outputs.iterdir())
    inline = server.pooling(path_request(media / "scene.tif", out_data_format="b64_json"))
    assert inline.status_code == 400 and "limit" in inline.text  # an inline answer is held whole: refused
    (outputs / "taken.tif").write_bytes(b"keep")
    taken = server.pooling(path_request(media / "scene.tif", out_path="taken.tif"))
    assert taken.status_code == 400 and "already exists" in taken.text
    assert (outputs / "taken.tif").read_bytes() == b"keep"

    # A client that gives up mid-scene: vLLM cancels the request; the stream is aborted, no file.
    _leave_after(server, path_request(media / "big.tif", out_path="left.tif"), seconds=5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(p.name.startswith(".") for p in outputs.iterdir()):
        time.sleep(0.5)
    assert sorted(p.name for p in outputs.iterdir()) == sorted([*before, "taken.tif"])
    small = server.pooling(path_request(media / "crop.tif", out_path="after.tif"), timeout=600)
    assert small.status_code == 200, small.text  # and the server keeps serving


def _leave_after(server: Server, data: dict[str, object], seconds: float) -> None:
    try:
        server.pooling(data, timeout=seconds)
    except requests.Timeout:
        return
    raise AssertionError("the streamed request finished before its client left; make the scene larger")
