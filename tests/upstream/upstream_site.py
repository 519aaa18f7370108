"""What upstream's tests download, built locally: a tiny Sen1Floods11-style Prithvi model folder,
scenes like upstream's test images, a loopback HTTP server for them, and each scene's expected
output computed without our package (TerraTorch's own tiled inference over TerraTorch's own Sen1Floods11
statistics, written with TerraTorch's own segmentation writer), so a hash can be compared as
upstream's tests compare theirs."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import sys
import threading
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from reference import terratorch_location_coords, terratorch_predict_inputs, terratorch_tiled  # noqa: E402

from vllm_terratorch.testing.samples import (  # noqa: E402
    BANDS,
    TERRAMIND_BANDS,
    build_sample_task,
    sample_pretrained_cfg,
    sample_terramind_cfg,
    write_model_folder,
    write_sample_geotiff,
)

# The mission's Sen1Floods11 datamodule section: band names; files hold all 13 Sentinel-2 bands.
SEN1FLOODS11_DATA = {
    "class_path": "terratorch.datamodules.Sen1Floods11NonGeoDataModule",
    "init_args": {"bands": list(BANDS), "constant_scale": 0.0001, "no_data_replace": 0, "no_label_replace": -1,
                  "batch_size": 16, "num_workers": 0, "drop_last": True},
}
# TerraTorch's integration test images (config.py `input_images`), as local stand-ins:
# India_900498_S2Hand.tif holds 13 bands (the test sends `indices`), the Valencia scene 6 (HLS-like).
SCENES = {
    "india": {"name": "India_900498_S2Hand.tif", "bands": 13, "indices": [1, 2, 3, 8, 11, 12]},
    "valencia": {"name": "valencia_example_2024-10-26.tiff", "bands": 6},
}


# config.py's TerraMind case ("flood": one file per modality). Upstream's S1RTC and S2L2A files are
# ImpactMesh `.zarr.zip` time series read by ImpactMesh's datamodule (neither is installable here);
# the stand-ins are GeoTIFFs of the same names read by TerraTorch's GenericMultiModalDataModule.
TM_MODEL = "TerraMind-base-Flood"
TM_MODALITIES = ("DEM", "S1RTC", "S2L2A")
TM_SCENES = {"flood": {name: f"flood/EMSR354_23_37LFH_{name}.tif" for name in TM_MODALITIES}}


def sen1floods11_cfg() -> dict:
    cfg = sample_pretrained_cfg("segmentation")
    cfg["data"] = SEN1FLOODS11_DATA
    return cfg


def build_site(root: Path) -> Path:
    write_model_folder(root / "Prithvi-EO-2.0-300M-TL-Sen1Floods11", sen1floods11_cfg())
    write_model_folder(root / TM_MODEL, sample_terramind_cfg(TM_MODALITIES))
    (root / "media").mkdir()
    for seed, scene in enumerate(SCENES.values()):
        write_sample_geotiff(root / "media" / scene["name"], 96, 112, bands=scene["bands"], seed=seed)
    for files in TM_SCENES.values():
        for seed, (modality, name) in enumerate(files.items()):
            (root / "media" / name).parent.mkdir(parents=True, exist_ok=True)
            write_sample_geotiff(root / "media" / name, 96, 112, bands=TERRAMIND_BANDS[modality], seed=20 + seed)
    return root


class MediaServer:
    """A loopback stand-in for huggingface.co's `resolve/main/...` URLs."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def reference_classes(path: Path, indices: list[int] | None = None) -> np.ndarray:
    """The class mask a correct server returns for `path`, TerraTorch's own normalisation statistics and tiled inference."""
    import rasterio
    from terratorch.datamodules.sen1floods11 import MEANS, STDS

    cfg = sen1floods11_cfg()
    with rasterio.open(path) as source:
        pixels = source.read()
        nodata = source.nodata
    if indices is not None:
        pixels = pixels[indices]
    image = pixels.astype(np.float32)
    if nodata is not None:
        image[pixels == nodata] = 0  # no_data_replace
    image = image * np.float32(0.0001)
    means = np.array([MEANS[band] for band in BANDS], dtype=np.float32)[:, None, None]
    stds = np.array([STDS[band] for band in BANDS], dtype=np.float32)[:, None, None]
    image = (image - means) / stds
    network = build_sample_task(cfg).model
    coords = terratorch_location_coords(path)[None]
    tiling = cfg["model"]["init_args"]["tiled_inference_parameters"]
    # Without oneDNN: on CPUs with AMX (seen on Sapphire Rapids, torch 2.13) its ConvTranspose2d for
    # a batch of one is off by ~1e-2, which flips near-tie pixels; PyTorch's own kernels are exact.
    with torch.backends.mkldnn.flags(enabled=False):
        logits = terratorch_tiled(image, tiling["h_crop"], tiling["h_stride"],
                                  lambda tiles: network(tiles, location_coords=coords.expand(len(tiles), -1)).output)
    return logits.argmax(axis=0)


def tm_reference_classes(media: Path, files: dict[str, str], scratch: Path) -> np.ndarray:
    """The class mask a correct server returns for a TerraMind scene, without our package:
    TerraTorch's own datamodule on a folder of modality folders, then TerraTorch's own tiled inference
    (the modalities side by side as channels, split again for the network's dict input)."""
    import shutil

    cfg = sample_terramind_cfg(TM_MODALITIES)
    for modality, name in files.items():
        (scratch / modality).mkdir(parents=True, exist_ok=True)
        shutil.copy(media / name, scratch / modality / Path(name).name)
    inputs = terratorch_predict_inputs(cfg["data"], {modality: str(scratch / modality) for modality in files})
    order = list(cfg["input"]["data"])
    image = torch.cat([inputs[modality][0] for modality in order]).numpy()
    bounds = np.cumsum([0] + [TERRAMIND_BANDS[modality] for modality in order])
    network = build_sample_task(cfg).model
    tiling = cfg["model"]["init_args"]["tiled_inference_parameters"]

    def predict(tiles: torch.Tensor) -> torch.Tensor:
        return network({m: tiles[:, bounds[i]:bounds[i + 1]] for i, m in enumerate(order)}).output

    with torch.backends.mkldnn.flags(enabled=False):
        logits = terratorch_tiled(image, tiling["h_crop"], tiling["h_stride"], predict)
    return logits.argmax(axis=0)


def tm_terratorch_written(classes: np.ndarray, like: Path, scratch: Path) -> bytes:
    """`classes` as TerraTorch's `terratorch_tm_segmentation` processor writes them: its own
    `write_tiff` with the input file's metadata (class ids, not x 255)."""
    import rasterio
    from terratorch.cli_tools import write_tiff

    with rasterio.open(like) as source:
        meta = source.meta
    target = scratch / "tm_written.tif"
    write_tiff(classes, target, meta)
    return target.read_bytes()


def terratorch_written(classes: np.ndarray, like: Path) -> bytes:
    """`classes` as TerraTorch's `terratorch_segmentation` processor writes them (its own code)."""
    import rasterio
    from terratorch.vllm.plugins.segmentation.segmentation_io_processor import SegmentationIOProcessor

    with rasterio.open(like) as source:
        meta = source.meta
    meta.update(count=1, dtype="uint8", compress="lzw", nodata=0)  # as its post_process does
    plugin = types.SimpleNamespace(plugin_config=None)
    pixels = SegmentationIOProcessor._convert_np_uint8(plugin, torch.from_numpy(classes[None]).float())
    return base64.b64decode(SegmentationIOProcessor.save_geotiff(plugin, pixels, meta, "b64_json"))


def phash(data: bytes) -> str:
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.open(io.BytesIO(data))))
