"""Independent references, no vllm_terratorch code: the datamodule's normalisation of a scene (by
hand, or by TerraTorch's own datamodule), and TerraTorch's own tiled inference of a large scene."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def normalised_scene(path, means: list[float], stds: list[float], scale: float = 0.0001) -> tuple[torch.Tensor, torch.Tensor]:
    """A GeoTIFF as the datamodule feeds it to the model (scaled, standardised per band, batch of
    one) and its `location_coords` as TerraTorch's own datasets compute them (`[[lat, lon]]`)."""
    import rasterio

    with rasterio.open(path) as source:
        pixels = source.read().astype(np.float32) * scale
    mean = np.array(means, dtype=np.float32)[:, None, None]
    std = np.array(stds, dtype=np.float32)[:, None, None]
    return torch.from_numpy((pixels - mean) / std)[None], terratorch_location_coords(path)[None]


def terratorch_predict_inputs(data_cfg: dict, predict_root) -> dict | torch.Tensor:
    """TerraTorch's own predict pipeline, as its TerraMind IO processor runs it: the datamodule built
    by TerraTorch's vLLM helper with its predict root on the files, one batch, `datamodule.aug`."""
    import copy

    from terratorch.vllm.plugins import generate_datamodule

    cfg = copy.deepcopy(data_cfg)
    cfg["init_args"]["predict_data_root"] = predict_root
    datamodule = generate_datamodule(cfg)
    datamodule.batch_size = 1
    datamodule.setup("predict")
    return datamodule.aug(next(iter(datamodule.predict_dataloader())))["image"]


def terratorch_location_coords(path) -> torch.Tensor:
    """TerraTorch's dataset code on the file: `FireScarsNonGeo._get_coords` (the centre pixel reprojected
    to EPSG:4326, `[lat, lon]`), which does not use the dataset instance."""
    import rioxarray
    from terratorch.datasets.fire_scars import FireScarsNonGeo

    return FireScarsNonGeo._get_coords(None, rioxarray.open_rasterio(path, masked=True))


def assert_same_classes(answer: np.ndarray, logits: np.ndarray) -> None:
    """Class ids (H, W) equal the reference logits' (K, H, W) argmax wherever the reference is not a
    near-tie (float32 sums in another order may flip those)."""
    top2 = np.sort(logits, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 1e-4
    assert decided.mean() > 0.9
    assert np.array_equal(answer[decided], logits.argmax(axis=0)[decided])


def terratorch_tiled(image: np.ndarray, crop: int, stride: int, predict: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """image (C, H, W) float32 -> (K, H, W) by TerraTorch's own `tiled_inference` (what `terratorch
    predict` runs for a config with these `tiled_inference_parameters`); `predict` maps a batch of
    (N, C, crop, crop) tiles to (N, K, crop, crop)."""
    from terratorch.tasks.tiled_inference import tiled_inference

    with torch.no_grad():
        return tiled_inference(predict, torch.from_numpy(image)[None], crop=crop, stride=stride)[0].float().numpy()
