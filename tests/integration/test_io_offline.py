"""The regression and classification IO processors through the offline API (`llm.encode` with
`io_processor_plugin`), compared with a plain PyTorch forward of the same weights."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import rasterio
import torch
from helpers import engine
from reference import normalised_scene, terratorch_tiled

from vllm_terratorch.testing.samples import MEANS, STDS, build_sample_task, sample_pretrained_cfg, write_model_folder, write_sample_geotiff

pytestmark = pytest.mark.integration


def normalised(path) -> tuple[torch.Tensor, torch.Tensor]:
    return normalised_scene(path, MEANS, STDS)


def encode_plugin(llm, scene, out_data_format="b64_json"):
    data = {"data": base64.b64encode(scene.read_bytes()).decode(), "data_format": "b64_json", "out_data_format": out_data_format}
    return llm.encode({"data": data}, pooling_task="plugin", use_tqdm=False)[0].outputs


def test_regression_processor(tmp_path):
    cfg = sample_pretrained_cfg("regression")
    folder = write_model_folder(tmp_path / "model", cfg)
    tile = write_sample_geotiff(tmp_path / "tile.tif", 64, 64, seed=5)
    scene = write_sample_geotiff(tmp_path / "scene.tif", 90, 130, seed=6, nodata=-9999)
    with rasterio.open(scene, "r+") as dataset:  # a nodata corner
        pixels = dataset.read()
        pixels[:, :5, :5] = -9999
        dataset.write(pixels)
    with engine(folder, io_processor_plugin="terratorch_regression") as llm:
        single = encode_plugin(llm, tile)
        large = encode_plugin(llm, scene)
    with rasterio.open(io.BytesIO(base64.b64decode(single.data))) as source:
        values = source.read()
        assert source.dtypes[0] == "float32" and values.shape == (1, 64, 64)
    image, coords = normalised(tile)
    with torch.no_grad():
        expected = build_sample_task(cfg).model(x=image, location_coords=coords).output[0].numpy()
    assert np.abs(values[0] - expected).max() <= 1e-4
    with rasterio.open(io.BytesIO(base64.b64decode(large.data))) as source:
        values = source.read(1)
        assert values.shape == (90, 130)
        with rasterio.open(scene) as original:
            assert (source.crs, source.transform) == (original.crs, original.transform)
    assert np.isnan(values[:5, :5]).all() and np.isfinite(values[5:, 5:]).all()
    # Stitched tiles (64 px, stride 48: the config's tiled_inference_parameters) equal TerraTorch's own tiled inference.
    image, coords = normalised(scene)
    pixels = image[0].numpy()
    # nodata pixels become no_data_replace (0), then are normalised, as the datamodule does.
    pixels[:, :5, :5] = (0.0 - np.array(MEANS, dtype=np.float32)[:, None, None]) / np.array(STDS, dtype=np.float32)[:, None, None]
    network = build_sample_task(cfg).model
    expected = terratorch_tiled(pixels, 64, 48, lambda tiles: network(x=tiles, location_coords=coords.expand(len(tiles), -1)).output)
    assert np.nanmax(np.abs(values[5:, 5:] - expected[0, 5:, 5:])) <= 1e-4


def test_classification_processor(tmp_path):
    cfg = sample_pretrained_cfg("classification")
    folder = write_model_folder(tmp_path / "model", cfg, weight_format="safetensors")
    tile = write_sample_geotiff(tmp_path / "tile.tif", 64, 64, seed=8)
    with engine(folder, io_processor_plugin="terratorch_classification") as llm:
        result = encode_plugin(llm, tile)
        larger = encode_plugin(llm, write_sample_geotiff(tmp_path / "big.tif", 100, 100, seed=9))
    assert result.data_format == "json"
    image, _ = normalised(tile)
    with torch.no_grad():
        expected = torch.softmax(build_sample_task(cfg).model(image).output[0], dim=0)
    assert np.abs(np.array(result.data["probabilities"]) - expected.numpy()).max() <= 1e-5
    assert result.data["predicted_class"] == int(expected.argmax())
    assert larger.data["tiles"] == 4 and abs(sum(larger.data["probabilities"]) - 1) < 1e-5
