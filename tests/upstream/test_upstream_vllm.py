"""vLLM's own Prithvi clients and IO-processor tests, against our server and `LLM`.

Adapted from vllm-project/vllm:
- `examples/pooling/plugin/prithvi_geospatial_mae_online.py` @715dbadccab19f0e370758ac55997183abadc5d1
- `examples/pooling/plugin/prithvi_geospatial_mae_io_processor.py` @09de992ca0e4aada6d30cc847d24a4c169dbaf54
- `tests/plugins_tests/test_terratorch_io_processor_plugins.py` @b5ade7901f892a82facd0c403f40ea2820311cbf
Kept: every payload field (`"image_format": "tiff"`, top-level `"priority": 0`, `"softmax": False`),
the engine arguments, the calls (`LLM.encode(prompt, pooling_task="plugin")`) and every
assertion. Changed, because upstream downloads: a tiny Sen1Floods11-style model folder, the
Valencia scene from a loopback server, and the expected hash computed for the tiny model without
our package. vLLM's tests run its example processor `prithvi_to_tiff` (in vLLM's test tree, not
installed); here they run ours, `terratorch_segmentation`, whose response carries the same
`type`/`format`/`data` fields. The BurnScars case needs a second model and is left out; the
online test is a plain function (it awaits nothing; pytest-asyncio is not installed), and
`vllm_runner` (vLLM's test fixture) is replaced by `LLM` with the same arguments.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import imagehash
import numpy as np
import pybase64 as base64
import pytest
import requests
from PIL import Image
from upstream_site import SCENES, MediaServer, build_site, reference_classes
from vllm.entrypoints.pooling.pooling.protocol import IOProcessorResponse

from vllm_terratorch.testing.launcher import Server

pytestmark = pytest.mark.integration
MODEL_DIR = "Prithvi-EO-2.0-300M-TL-Sen1Floods11"
PLUGIN = "terratorch_segmentation"  # upstream's tests: "prithvi_to_tiff", vLLM's own example plugin


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = build_site(tmp_path_factory.mktemp("upstream-vllm"))
    media = MediaServer(root / "media")
    scene = root / "media" / SCENES["valencia"]["name"]
    expected = str(imagehash.phash(Image.fromarray(reference_classes(scene).astype(np.uint8))))
    yield {"root": root, "model": str(root / MODEL_DIR), "image_url": media.url(scene.name), "out_hash": expected}
    media.close()


def _compute_image_hash(base64_data: str) -> str:
    decoded_image = base64.b64decode(base64_data)
    image = Image.open(io.BytesIO(decoded_image))
    return str(imagehash.phash(image))


@pytest.fixture(scope="module")
def server(site):
    """The test's `server` fixture: its arguments, in a real `vllm serve` process."""
    args = [
        "--runner",
        "pooling",
        "--enforce-eager",
        "--skip-tokenizer-init",
        "--max-num-seqs",
        "32",
        "--io-processor-plugin",
        PLUGIN,
        "--enable-mm-embeds",
    ]
    with Server(site["model"], args, site["root"] / "server.log") as remote_server:
        remote_server.wait_ready()
        yield remote_server


def test_prithvi_mae_plugin_online(server, site):
    model_name, image_url, expected_hash = site["model"], site["image_url"], site["out_hash"]
    request_payload_url = {
        "data": {
            "data": image_url,
            "data_format": "url",
            "image_format": "tiff",
            "out_data_format": "b64_json",
        },
        "priority": 0,
        "model": model_name,
        "softmax": False,
    }

    ret = requests.post(f"{server.url}/pooling", json=request_payload_url)

    response = ret.json()

    # verify the request response is in the correct format
    assert (parsed_response := IOProcessorResponse(**response))

    # verify the output is formatted as expected for this plugin
    plugin_data = parsed_response.data
    assert all(plugin_data.get(attr) for attr in ["type", "format", "data"])

    # Compute the output image hash and compare it against the expected hash
    image_hash = _compute_image_hash(plugin_data["data"])
    assert image_hash == expected_hash, f"Image hash mismatch: expected {expected_hash}, got {image_hash}"


def test_online_example_client(server, site, tmp_path, monkeypatch):
    """The online example's `main()`, with its endpoint, URL and model name pointed here."""
    monkeypatch.chdir(tmp_path)
    image_url = site["image_url"]
    server_endpoint = f"{server.url}/pooling"

    request_payload_url = {
        "data": {
            "data": image_url,
            "data_format": "url",
            "image_format": "tiff",
            "out_data_format": "b64_json",
        },
        "priority": 0,
        "model": site["model"],
    }

    ret = requests.post(server_endpoint, json=request_payload_url)

    print(f"response.status_code: {ret.status_code}")
    print(f"response.reason:{ret.reason}")

    response = ret.json()

    decoded_image = base64.b64decode(response["data"]["data"])

    out_path = os.path.join(os.getcwd(), "online_prediction.tiff")

    with open(out_path, "wb") as f:
        f.write(decoded_image)

    assert ret.status_code == 200
    assert str(imagehash.phash(Image.open(out_path))) == site["out_hash"]


def test_prithvi_mae_plugin_offline(site):
    from vllm import LLM

    img_data = dict(
        data=site["image_url"],
        data_format="url",
        image_format="tiff",
        out_data_format="b64_json",
    )

    prompt = dict(data=img_data)

    llm = LLM(
        site["model"],
        runner="pooling",
        skip_tokenizer_init=True,
        enable_mm_embeds=True,
        enforce_eager=True,
        max_num_seqs=32,
        io_processor_plugin=PLUGIN,
    )
    try:
        pooler_output = llm.encode(prompt, pooling_task="plugin")
    finally:
        llm.llm_engine.engine_core.shutdown()

    output = pooler_output[0].outputs

    # verify the output is formatted as expected for this plugin
    assert all(hasattr(output, attr) for attr in ["type", "format", "data"])

    image_hash = _compute_image_hash(output.data)
    expected_hash = site["out_hash"]
    assert image_hash == expected_hash, f"Image hash mismatch: expected {expected_hash}, got {image_hash}"


OFFLINE_EXAMPLE = '''
import base64
import os

import torch

from vllm import LLM


def main():
    torch.set_default_dtype(torch.float16)
    image_url = {image_url!r}

    img_data = dict(
        data=image_url,
        data_format="url",
        image_format="tiff",
        out_data_format="b64_json",
    )

    prompt = dict(data=img_data)

    llm = LLM(
        model={model!r},
        skip_tokenizer_init=True,
        trust_remote_code=True,
        enforce_eager=True,
        # Limit the maximum number of parallel requests
        # to avoid the model going OOM.
        # The maximum number depends on the available GPU memory
        max_num_seqs=32,
        io_processor_plugin="terratorch_segmentation",
        model_impl="terratorch",
        enable_mm_embeds=True,
    )

    pooler_output = llm.encode(prompt, pooling_task="plugin")
    output = pooler_output[0].outputs

    print(output)
    decoded_data = base64.b64decode(output.data)

    file_path = os.path.join(os.getcwd(), "offline_prediction.tiff")
    with open(file_path, "wb") as f:
        f.write(decoded_data)

    print(f"Output file path: {{file_path}}")


if __name__ == "__main__":
    main()
'''


def test_offline_example_script(site, tmp_path):
    """The offline example as a script of its own (it sets torch's default dtype to float16 for the
    whole process), only the URL and model name replaced."""
    script = tmp_path / "prithvi_geospatial_mae_io_processor.py"
    script.write_text(textwrap.dedent(OFFLINE_EXAMPLE.format(image_url=site["image_url"], model=site["model"])))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Output file path: {tmp_path / 'offline_prediction.tiff'}" in result.stdout
    assert str(imagehash.phash(Image.open(tmp_path / "offline_prediction.tiff"))) == site["out_hash"]
