"""TerraTorch's own serving integration test, against our server.

Adapted from torchgeo/terratorch `integrationtests/vLLM/` at commit
7ed0d148bd7e79f469653c3ac95436ea828964af (`test_segmentation_io_processor.py`, `utils.py`,
`config.py`; the same files as TerraTorch 1.2.10's plugin era). Kept as upstream wrote them: every
payload field (`"image_format": ""`, `indices`, `out_path`, `softmax`), the server's command-line
flags and its configuration variable (TERRATORCH_SEGMENTATION_IO_PROCESSOR_CONFIG), the request
and hash helpers, and every assertion. Changed, because upstream downloads: the model is a tiny
Sen1Floods11-style Prithvi folder with random weights, images come from a loopback HTTP server,
and the expected hashes (upstream's are literals for the real 300M model) are computed for the
tiny model without our package (`upstream_site.reference_classes`, written by TerraTorch's own
writer). The server writes TerraTorch's mask values (`mask_encoding: terratorch`), as a user
replacing TerraTorch's processor would configure it for hash-based checks. The TerraMind cases
(`terratorch_tm_segmentation`, model "terramind_base_flood", image "flood": a URL per modality, or
`download_files_to_local`'s folder of modality folders) run against a second server with a tiny
TerraMind model; their expected hash is TerraTorch's own datamodule + a plain forward, written with
TerraTorch's `write_tiff` as its TerraMind processor writes (class ids: our default encoding).
Upstream's flood inputs are ImpactMesh `.zarr.zip` files for ImpactMesh's datamodule, neither
installable here: the stand-ins are GeoTIFFs for TerraTorch's GenericMultiModalDataModule. The
working directory is a scratch folder: upstream creates its output folders in the current directory.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import uuid
from pathlib import Path

import imagehash
import pytest
import requests
from PIL import Image
from upstream_site import (
    SCENES,
    TM_MODEL,
    TM_SCENES,
    MediaServer,
    build_site,
    phash,
    reference_classes,
    terratorch_written,
    tm_reference_classes,
    tm_terratorch_written,
)

from vllm_terratorch.testing.launcher import Server

pytestmark = pytest.mark.integration
MODEL = "prithvi_300m_sen1floods11"
TM = "terramind_base_flood"
# config.py: `models`, `input_images` (URLs replaced by local files of the same names).
tm_server_args = [
    "--skip-tokenizer-init",
    "--enforce-eager",
    "--max-num-seqs",
    "32",
    "--io-processor-plugin",
    "terratorch_tm_segmentation",
    "--model-impl",
    "terratorch",
    "--enable-mm-embeds",
]
server_args = [
    "--skip-tokenizer-init",
    "--enforce-eager",
    "--max-num-seqs",
    "32",
    "--io-processor-plugin",
    "terratorch_segmentation",
    "--model-impl",
    "terratorch",
    "--enable-mm-embeds",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = build_site(tmp_path_factory.mktemp("upstream-terratorch"))
    media = MediaServer(root / "media")
    input_images = {
        name: {"image_url": media.url(scene["name"]), **({"indices": scene["indices"]} if "indices" in scene else {})}
        for name, scene in SCENES.items()
    }
    input_images |= {name: {"image_url": {m: media.url(f) for m, f in files.items()}} for name, files in TM_SCENES.items()}
    models_output = {
        MODEL: {
            name: phash(terratorch_written(reference_classes(root / "media" / scene["name"], scene.get("indices")), root / "media" / scene["name"]))
            for name, scene in SCENES.items()
        },
        TM: {
            name: phash(tm_terratorch_written(
                tm_reference_classes(root / "media", files, root / f"reference_{name}"),
                root / "media" / next(iter(files.values())), root / f"reference_{name}",
            ))
            for name, files in TM_SCENES.items()
        },
    }
    yield root, input_images, models_output
    media.close()


def started_server(root: Path, model: str, args: list[str], log: str, plugin_config: dict, envs: dict[str, str]):
    """utils.py `server` / `get_server`: a holder with the instance, its base_url and the model name;
    the plugin config points output_path at a temporary folder."""
    holder = type("Holder", (), {})()
    holder.tmpdir = tempfile.TemporaryDirectory(dir=root)
    server_envs = {"TERRATORCH_SEGMENTATION_IO_PROCESSOR_CONFIG": json.dumps({"output_path": holder.tmpdir.name, **plugin_config}), **envs}
    args = [*args, "--allowed-local-media-path", str(root), "--allowed-media-domains", "127.0.0.1"]
    holder.instance = Server(root / model, args, root / log, server_envs)
    holder.instance.base_url = holder.instance.url
    holder.model_name = holder.instance.model
    try:
        holder.instance.wait_ready()
        yield holder
    finally:
        holder.instance.close()
        holder.tmpdir.cleanup()


@pytest.fixture(scope="module")
def server(site):
    root, _, _ = site
    (root / "cwd").mkdir(exist_ok=True)
    plugin_config = {"mask_encoding": "terratorch", "allowed_output_paths": [str(root / "cwd")]}
    yield from started_server(root, "Prithvi-EO-2.0-300M-TL-Sen1Floods11", server_args, "server.log", plugin_config,
                              {"VLLM_LOGGING_LEVEL": "DEBUG"})


@pytest.fixture(scope="module")
def tm_server(site):
    """The TerraMind model, as `get_server` starts it for `terratorch_tm_segmentation` (class ids)."""
    root, _, _ = site
    (root / "cwd").mkdir(exist_ok=True)
    yield from started_server(root, TM_MODEL, tm_server_args, "tm_server.log", {"allowed_output_paths": [str(root / "cwd")]}, {})


@pytest.fixture
def in_scratch_cwd(site, monkeypatch):
    monkeypatch.chdir(site[0] / "cwd")


def download_files_to_local(image_url, download_dir):
    """utils.py, unchanged (the URLs are the loopback server's).

    For multi-modal inputs (dict), creates subdirectories for each modality
    and returns the root directory path. For single files, returns the file path.
    """
    if isinstance(image_url, dict):
        # Multi-modal input (e.g., TerraMind models)
        # Create subdirectories for each modality
        for modality, url in image_url.items():
            modality_dir = download_dir / modality
            modality_dir.mkdir(exist_ok=True)
            local_file = modality_dir / Path(url).name
            response = requests.get(url)
            local_file.write_bytes(response.content)
        # Return the root directory path for multi-modal inputs
        return str(download_dir)
    else:
        # Single file input
        local_file = download_dir / Path(image_url).name
        response = requests.get(image_url)
        local_file.write_bytes(response.content)
        return str(local_file)


def make_request_and_get_hash(server, model, input_config, image_data, data_format):
    """utils.py, unchanged."""
    request_payload = {
        "data": {
            "data": image_data,
            "data_format": data_format,
            "out_data_format": input_config["out_data_format"],
            "image_format": "",
        },
        "model": model,
        "softmax": False,
    }

    if "indices" in input_config:
        request_payload["data"]["indices"] = input_config["indices"]

    if "out_path" in input_config:
        request_payload["data"]["out_path"] = input_config["out_path"]

    url = f"{server.instance.base_url}/pooling"
    ret = requests.post(url, json=request_payload)
    assert ret.status_code == 200

    response = ret.json()

    if request_payload["data"]["out_data_format"] == "b64_json":
        decoded_image = base64.b64decode(response["data"]["data"])
        file_name = Path(server.tmpdir.name) / f"{uuid.uuid4()}.tiff"
        file_name.write_bytes(decoded_image)
    else:
        file_name = Path(response["data"]["data"])

    return str(imagehash.phash(Image.open(file_name)))


tests_per_model = sorted(
    [
        (MODEL, image, data_format, out_data_format)
        for image in SCENES
        for data_format in ["url", "path"]
        for out_data_format in ["b64_json", "path"]
    ],
    key=lambda x: (x[0], x[1], x[2], x[3]),
)


@pytest.mark.parametrize("model_name, image_name, data_format, out_data_format", tests_per_model)
def test_serving_segmentation_plugin(server, site, model_name, image_name, data_format, out_data_format):
    _, input_images, models_output = site
    model = server.model_name
    input_config = input_images[image_name]
    image_url = input_config["image_url"]
    expected_hash = models_output[model_name][image_name]

    # Prepare input data based on data_format
    if data_format == "url":
        image_data = image_url
    else:  # path
        download_dir = Path(server.tmpdir.name).parent / f"downloaded_inputs_{model_name}_{image_name}"
        download_dir.mkdir(parents=True, exist_ok=True)
        image_data = download_files_to_local(image_url, download_dir)

    test_input = {
        **input_config,
        "data_format": data_format,
        "out_data_format": out_data_format,
    }

    image_hash = make_request_and_get_hash(server, model, test_input, image_data, data_format)
    assert image_hash == expected_hash


def test_outputs_are_terratorchs_bytes(server, site):
    """Stronger than the hash: with mask_encoding terratorch, a b64 output is the very file
    TerraTorch's writer makes of the reference mask."""
    root, input_images, _ = site
    scene = SCENES["valencia"]
    payload = {"data": {"data": input_images["valencia"]["image_url"], "data_format": "url", "out_data_format": "b64_json", "image_format": ""},
               "model": server.model_name, "softmax": False}
    ret = requests.post(f"{server.instance.base_url}/pooling", json=payload, timeout=120)
    assert ret.status_code == 200, ret.text
    expected = terratorch_written(reference_classes(root / "media" / scene["name"]), root / "media" / scene["name"])
    assert base64.b64decode(ret.json()["data"]["data"]) == expected


@pytest.mark.parametrize("image_name", ["valencia"])
def test_custom_out_path_override(server, site, in_scratch_cwd, image_name):
    """Test that the out_path field in the request overrides the plugin configuration."""
    _, input_images, models_output = site
    model = server.model_name
    input_config = input_images[image_name]
    image_url = input_config["image_url"]

    curr_dir = Path.cwd()
    with tempfile.TemporaryDirectory(dir=curr_dir) as custom_output_dir:
        request_payload = {
            "data": {
                "data": image_url,
                "data_format": "url",
                "out_data_format": "path",
                "out_path": custom_output_dir,  # Custom output path
                "image_format": "",
            },
            "model": model,
        }

        url = f"{server.instance.base_url}/pooling"
        ret = requests.post(url, json=request_payload)
        assert ret.status_code == 200

        response = ret.json()
        file_name = response["data"]["data"]

        assert file_name.startswith(custom_output_dir), (
            f"Expected file to be in {custom_output_dir}, but got {file_name}"
        )
        assert os.path.exists(file_name), f"Output file {file_name} does not exist"
        image_hash = str(imagehash.phash(Image.open(file_name)))
        assert image_hash == models_output[MODEL][image_name]


@pytest.mark.parametrize("image_name", ["valencia"])
def test_custom_out_path_validation(server, site, in_scratch_cwd, image_name):
    """Test that invalid out_path raises appropriate errors."""
    _, input_images, _ = site
    model = server.model_name
    image_url = input_images[image_name]["image_url"]

    request_payload = {
        "data": {
            "data": image_url,
            "data_format": "url",
            "out_data_format": "path",
            "out_path": "/nonexistent/path/that/does/not/exist",
            "image_format": "",
        },
        "model": model,
    }

    url = f"{server.instance.base_url}/pooling"
    ret = requests.post(url, json=request_payload)
    assert ret.status_code != 200, "Expected error for non-existent path"

    curr_dir = Path.cwd()
    with tempfile.TemporaryDirectory(dir=curr_dir) as tmpdir:
        readonly_dir = Path(tmpdir) / "readonly"
        readonly_dir.mkdir()
        readonly_dir.chmod(0o444)

        request_payload["data"]["out_path"] = str(readonly_dir)

        ret = requests.post(url, json=request_payload)
        assert ret.status_code != 200, "Expected error for non-writable path"
        # Ours says why, as a client error, and wrote nothing (upstream checks only != 200).
        assert ret.status_code == 400 and "read-only" in ret.text, ret.text
        readonly_dir.chmod(0o755)
        assert list(readonly_dir.iterdir()) == []


tm_tests = sorted((TM, image, data_format, out_data_format) for image in TM_SCENES
                  for data_format in ["url", "path"] for out_data_format in ["b64_json", "path"])


@pytest.mark.parametrize("model_name, image_name, data_format, out_data_format", tm_tests)
def test_serving_tm_segmentation_plugin(tm_server, site, model_name, image_name, data_format, out_data_format):
    """test_serving_segmentation_plugin's TerraMind rows (upstream parametrizes one test over both)."""
    test_serving_segmentation_plugin(tm_server, site, model_name, image_name, data_format, out_data_format)


@pytest.mark.parametrize("image_name", list(TM_SCENES))
def test_tm_custom_out_path_override(tm_server, site, in_scratch_cwd, image_name):
    """test_custom_out_path_override's ("terramind_base_flood", "flood") row."""
    _, input_images, models_output = site
    curr_dir = Path.cwd()
    with tempfile.TemporaryDirectory(dir=curr_dir) as custom_output_dir:
        request_payload = {
            "data": {
                "data": input_images[image_name]["image_url"],
                "data_format": "url",
                "out_data_format": "path",
                "out_path": custom_output_dir,  # Custom output path
                "image_format": "",
            },
            "model": tm_server.model_name,
        }
        ret = requests.post(f"{tm_server.instance.base_url}/pooling", json=request_payload)
        assert ret.status_code == 200, ret.text
        file_name = ret.json()["data"]["data"]
        assert file_name.startswith(custom_output_dir)
        assert os.path.exists(file_name), f"Output file {file_name} does not exist"
        assert str(imagehash.phash(Image.open(file_name))) == models_output[TM][image_name]


@pytest.mark.parametrize("image_name", list(TM_SCENES))
def test_tm_custom_out_path_validation(tm_server, site, in_scratch_cwd, image_name):
    """test_custom_out_path_validation's ("terramind_base_flood", "flood") row."""
    _, input_images, _ = site
    request_payload = {
        "data": {
            "data": input_images[image_name]["image_url"],
            "data_format": "url",
            "out_data_format": "path",
            "out_path": "/nonexistent/path/that/does/not/exist",
            "image_format": "",
        },
        "model": tm_server.model_name,
    }
    url = f"{tm_server.instance.base_url}/pooling"
    ret = requests.post(url, json=request_payload)
    assert ret.status_code != 200, "Expected error for non-existent path"
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmpdir:
        readonly_dir = Path(tmpdir) / "readonly"
        readonly_dir.mkdir()
        readonly_dir.chmod(0o444)
        request_payload["data"]["out_path"] = str(readonly_dir)
        ret = requests.post(url, json=request_payload)
        assert ret.status_code == 400 and "read-only" in ret.text, ret.text
        readonly_dir.chmod(0o755)
