"""No load takes the engine down: vLLM stops the engine (for every client) when one step outlasts
VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS; the backend schedules at most as many requests per step as the
forward measured at start-up fits into a quarter of it.

Here the timeout is 2 s and `--max-num-seqs 64`: 64 concurrent 256x256 requests in one step take
longer than that on a 2-core CPU, so without the bound the engine dies; with it, every request
succeeds over several shorter steps and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import rasterio
import requests
from helpers import assert_masks_agree

from vllm_terratorch.testing.launcher import DOCUMENTED, Server
from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff

pytestmark = pytest.mark.integration
TIMEOUT_S = 2
MAX_NUM_SEQS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("step-budget")
    write_model_folder(root / "model", sample_pretrained_cfg("segmentation", image_size=256))
    write_sample_geotiff(root / "tile.tif", 256, 256, seed=3)
    env = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": str(TIMEOUT_S), "VLLM_TERRATORCH_IO_CONFIG": json.dumps({"output_path": str(root / "out")})}
    server = Server(root / "model", [*DOCUMENTED, "--max-num-seqs", str(MAX_NUM_SEQS)], root / "server.log", env)
    server.tile = base64.b64encode((root / "tile.tif").read_bytes()).decode()
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def test_a_full_batch_of_requests_does_not_stop_the_engine(server):
    payload = {"data": server.tile, "data_format": "b64_json", "out_data_format": "b64_json"}
    with ThreadPoolExecutor(MAX_NUM_SEQS) as pool:
        responses = list(pool.map(lambda _: server.pooling(payload, timeout=300), range(MAX_NUM_SEQS)))
    assert [r.status_code for r in responses] == [200] * MAX_NUM_SEQS, responses[0].text
    masks = [rasterio.open(io.BytesIO(base64.b64decode(r.json()["data"]["data"]))).read(1) for r in responses]
    for index, mask in enumerate(masks):  # the same tile, the same answer (steps of other sizes: near-ties aside)
        assert_masks_agree(mask, masks[0], index)
    assert len(np.unique(masks[0])) > 1
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    assert "EngineDeadError" not in server.log() and "timed out" not in server.log()
    assert "scheduling at most" in server.log()  # the bound was applied at start-up
