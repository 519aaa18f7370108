"""The mission's serving document, end to end: the documented `vllm serve` line, the documented
`/pooling` payload (URL in, path out), and the other input/output formats, against one server."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import re
import threading

import numpy as np
import pytest
import rasterio
import requests
from helpers import assert_masks_agree
import torch

from reference import normalised_scene

from vllm_terratorch.testing.launcher import DOCUMENTED, Server
from vllm_terratorch.testing.samples import MEANS, STDS, build_sample_task, sample_pretrained_cfg, write_model_folder, write_sample_geotiff

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("segmentation")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    (root / "media").mkdir()
    (root / "outputs").mkdir()
    write_model_folder(root / "model", CFG)
    write_sample_geotiff(root / "media" / "tile.tif", 64, 64, seed=1)
    write_sample_geotiff(root / "media" / "scene.tif", 100, 150, seed=2)
    write_sample_geotiff(root / "media" / "four_bands.tif", 64, 64, bands=4, seed=3)
    return root


@pytest.fixture(scope="module")
def media_url(workdir):
    """A loopback HTTP server for the media folder (the mission's example fetches a URL)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(workdir / "media"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(workdir):
    env = {"VLLM_TERRATORCH_IO_CONFIG": json.dumps({"output_path": str(workdir / "outputs")})}
    # The documented line, plus where local files may be read from.
    server = Server(workdir / "model", [*DOCUMENTED, "--allowed-local-media-path", str(workdir / "media")], workdir / "server.log", env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def reference_mask(path, dtype=torch.float32) -> np.ndarray:
    """Plain PyTorch for one model-sized tile: normalise as the datamodule does, forward, argmax."""
    image, coords = normalised_scene(path, MEANS, STDS)
    network = build_sample_task(CFG).model.to(dtype)
    with torch.no_grad():
        logits = network(image.to(dtype), location_coords=coords.to(dtype)).output[0]
    return logits.float().argmax(dim=0).numpy().astype(np.uint8)


def read_output(data: bytes | str):
    source = rasterio.open(io.BytesIO(base64.b64decode(data))) if isinstance(data, str) and not data.startswith("/") else rasterio.open(data)
    with source:
        return source.read(), source.crs, source.transform, source.nodata, source.dtypes[0]


def test_mission_payload_url_in_path_out(server, workdir, media_url):
    payload = {"data": f"{media_url}/tile.tif", "data_format": "url", "out_data_format": "path", "image_format": "geoTiff"}
    response = server.pooling(payload)
    assert response.status_code == 200, response.text
    out_file_path = response.json()["data"]["data"]  # exactly as the mission document reads it
    assert out_file_path.startswith(str(workdir / "outputs"))
    mask, crs, transform, nodata, dtype = read_output(out_file_path)
    with rasterio.open(workdir / "media" / "tile.tif") as source:
        assert (crs, transform) == (source.crs, source.transform)
    assert mask.shape == (1, 64, 64) and dtype == "uint8" and nodata == 255
    expected = reference_mask(workdir / "media" / "tile.tif")
    agreement = (mask[0] == expected).mean()
    assert agreement >= 0.999, agreement  # float32 on CPU with no --dtype, as the reference
    assert "in float32 on CPU" in server.log()


def test_path_and_base64_give_the_same_prediction(server, workdir, media_url):
    scene = workdir / "media" / "scene.tif"
    by_path = server.pooling({"data": str(scene), "data_format": "path", "out_data_format": "b64_json", "image_format": "geoTiff"})
    encoded = base64.b64encode(scene.read_bytes()).decode()
    by_b64 = server.pooling({"data": encoded, "data_format": "b64_json", "out_data_format": "b64_json"})
    by_url = server.pooling({"data": f"{media_url}/scene.tif", "data_format": "url", "out_data_format": "b64_json"})
    outputs = [read_output(r.json()["data"]["data"]) for r in (by_path, by_b64, by_url)]
    for mask, crs, transform, _, _ in outputs:
        assert mask.shape == (1, 100, 150)  # stitched back to the input's exact size
        with rasterio.open(scene) as source:
            assert (crs, transform) == (source.crs, source.transform)
        assert np.array_equal(mask, outputs[0][0])
    assert len(np.unique(outputs[0][0])) > 1


def test_requests_in_parallel_get_their_own_results(server, workdir):
    tile = workdir / "media" / "tile.tif"
    scene = workdir / "media" / "scene.tif"
    single = {p: read_output(server.pooling({"data": str(p), "data_format": "path", "out_data_format": "b64_json"}).json()["data"]["data"])[0] for p in (tile, scene)}
    from concurrent.futures import ThreadPoolExecutor

    order = [tile, scene] * 4
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: server.pooling({"data": str(p), "data_format": "path", "out_data_format": "b64_json"}), order))
    for path, response in zip(order, responses):
        assert response.status_code == 200, response.text
        assert_masks_agree(read_output(response.json()["data"]["data"])[0], single[path], path)


def test_the_forward_gets_every_cpu_core_by_default(server):
    """The documented line on CPU: no core kept for vLLM's scheduler (logged), the forward's OpenMP
    threads on every core; test_hostile's server sets the variable itself and keeps its value."""
    log = server.log()
    assert "gets every CPU core" in log
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU=0" in log


def test_the_forward_runs_in_the_engine_core_process(server):
    """The documented line on CPU starts two processes, not three: the API server and vLLM's engine
    core, whose worker runs our forward (engine/compat.worker_in_engine_process; logged)."""
    import psutil

    log = server.log()
    assert "runs inside vLLM's engine-core process" in log
    # vLLM's start-up tries to drop the engine core's torch threads to 1 ("Reducing Torch threads"),
    # which its CPU worker then skips: our forward's own log says what it really runs at.
    threads = re.search(r"dummy requests took [\d.]+ s at (\d+) torch threads", log)
    assert threads is not None, log[-3000:]
    assert int(threads.group(1)) >= min(2, os.cpu_count() or 1)
    commands = [" ".join(child.cmdline()) for child in psutil.Process(server.process.pid).children(recursive=True)]
    assert any("EngineCore" in command for command in commands), commands
    assert not any("VLLM::Worker" in command for command in commands), commands


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"data": "not base64!", "data_format": "b64_json", "out_data_format": "b64_json"}, "not valid base64"),
        ({"data": base64.b64encode(b"plain text").decode(), "data_format": "b64_json", "out_data_format": "b64_json"}, "not a readable GeoTIFF"),
        ({"data": "/etc/passwd", "data_format": "path", "out_data_format": "path"}, "outside the allowed media folder"),
        ({"data": "../model/config.json", "data_format": "path", "out_data_format": "path"}, "outside the allowed media folder"),
        ({"data": "file:///etc/passwd", "data_format": "url", "out_data_format": "path"}, "scheme 'file' is not allowed"),
        ({"data": "tile.tif", "data_format": "path", "out_data_format": "path", "image_format": "png"}, "image_format"),
        ({"data": "tile.tif", "data_format": "s3", "out_data_format": "path"}, "data_format"),
        ({"data": "tile.tif", "data_format": "path", "out_data_format": "path", "out_path": "/tmp/x.tif"}, "outside the server's output folders"),
        ({"data": "four_bands.tif", "data_format": "path", "out_data_format": "b64_json"}, "4 bands"),
        ({"data_format": "path", "out_data_format": "path"}, "data.data"),
    ],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(server, workdir, data, message):
    response = server.pooling(data)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    good = server.pooling({"data": "tile.tif", "data_format": "path", "out_data_format": "b64_json"})
    assert good.status_code == 200, good.text


def test_log_names_our_classes(server):
    log = server.log()
    assert "IO processor terratorch_segmentation is served by vllm_terratorch.io.processor.SegmentationProcessor" in log
    assert "architecture Terratorch is served by vllm_terratorch.engine.model:TerratorchModel" in log
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    # vLLM's loader timed our weight loading from a clock origin (compat.time_weight_loading):
    # "Loading weights took 5858.99 seconds" for a tiny model; now the load itself.
    (took,) = re.findall(r"Loading weights took ([0-9.]+) seconds", log)
    assert float(took) < 60, took
