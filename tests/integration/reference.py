"""Independent plain-PyTorch references, no vllm_terratorch code: the datamodule's normalisation of
a scene (by hand, or by TerraTorch's own datamodule), and the sliding window (reflect-pad, run every window, blend overlaps with linear ramps,
the documented blending, crop back)."""

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


def ramp(crop: int, stride: int) -> np.ndarray:
    overlap = crop - stride
    if overlap == 0:
        return np.ones(crop)
    edge_distance = np.minimum(np.arange(crop), crop - 1 - np.arange(crop)) + 0.5
    return np.minimum(edge_distance / overlap, 1.0)


def sliding_window(image: np.ndarray, crop: int, stride: int, predict: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """image (C, H, W) float32 -> (K, H, W); `predict` maps a (1, C, crop, crop) tile to (K, crop, crop)."""
    _, height, width = image.shape
    padded_h = max(height, crop) + (-(max(height, crop) - crop)) % stride
    padded_w = max(width, crop) + (-(max(width, crop) - crop)) % stride
    padded = np.pad(image, ((0, 0), (0, padded_h - height), (0, padded_w - width)), mode="reflect")
    weight = np.outer(ramp(crop, stride), ramp(crop, stride))
    total, norm = None, np.zeros((padded_h, padded_w))
    for top in range(0, padded_h - crop + 1, stride):
        for left in range(0, padded_w - crop + 1, stride):
            tile = torch.from_numpy(np.ascontiguousarray(padded[:, top : top + crop, left : left + crop]))[None]
            with torch.no_grad():
                out = predict(tile).float().numpy()
            out = out[None] if out.ndim == 2 else out
            if total is None:
                total = np.zeros((out.shape[0], padded_h, padded_w))
            total[:, top : top + crop, left : left + crop] += out * weight
            norm[top : top + crop, left : left + crop] += weight
    return (total / norm)[:, :height, :width]
