"""What each task makes of a request's stitched model output: a class mask or a values GeoTIFF, or
class probabilities as JSON. Everything before that (reading, normalising, tiling, stitching) is
the shared pipeline in pipeline.py; a raster task maps stitched rows to output rows
(`raster_rows`), so a scene streamed in row bands (windows.py) is rendered by the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vllm_terratorch.errors import RequestError
from vllm_terratorch.io.pipeline import GeoTiffPipeline, Pending


class SegmentationPipeline(GeoTiffPipeline):
    """Class mask (uint8 GeoTIFF).

    `mask_encoding: "ids"` (default): class ids, input nodata pixels 255 (the output's nodata), so a
    multi-class mask keeps every class. `"terratorch"`: what TerraTorch's processor writes, the class
    id times 255 wrapped to uint8 with nodata 0 (class 0 then reads as nodata, and classes above 1
    collide), for clients that threshold at 255 or compare hashes of upstream's files.
    """

    task = "segmentation"
    NODATA = 255

    @property
    def output_nodata(self) -> float:
        return 0 if self.settings.mask_encoding == "terratorch" else self.NODATA

    def raster_rows(self, logits: np.ndarray, nodata_mask: np.ndarray) -> np.ndarray:
        if logits.shape[0] >= self.NODATA:
            raise RequestError(f"the model predicts {logits.shape[0]} classes; a uint8 mask holds at most 254")
        classes = logits.argmax(axis=0)[None]
        if self.settings.mask_encoding == "terratorch":
            # TerraTorch: `(prediction.float().numpy() * 255.0).astype(np.uint8)`, meta nodata=0.
            return (classes.astype(np.float32) * np.float32(255.0)).astype(np.uint8)
        mask = classes.astype(np.uint8)
        mask[nodata_mask] = self.NODATA
        return mask


class RegressionPipeline(GeoTiffPipeline):
    """Per-pixel values (float32 GeoTIFF); input nodata pixels are NaN, the output's nodata value."""

    task = "regression"
    output_nodata = float("nan")

    def raster_rows(self, values: np.ndarray, nodata_mask: np.ndarray) -> np.ndarray:
        values = values.astype(np.float32)
        values[np.broadcast_to(nodata_mask, values.shape)] = np.nan
        return values


class ClassificationPipeline(GeoTiffPipeline):
    """Class probabilities of the whole image (JSON): tile logits averaged, then softmax."""

    task = "classification"
    writes_raster = False

    def render(self, outputs: list[torch.Tensor], pending: Pending) -> bytes | dict[str, Any]:
        logits = torch.stack([out.float().reshape(-1) for out in outputs]).mean(dim=0)
        probabilities = torch.softmax(logits, dim=0).tolist()
        names = (self.pretrained_cfg.data or {}).get("init_args", {}).get("class_names")
        result = {
            "predicted_class": int(np.argmax(probabilities)),
            "probabilities": probabilities,
            "tiles": len(outputs),
        }
        if isinstance(names, list) and len(names) == len(probabilities):
            result["class_names"] = names
        return result


PIPELINES: dict[str, type[GeoTiffPipeline]] = {
    pipeline.task: pipeline for pipeline in (SegmentationPipeline, RegressionPipeline, ClassificationPipeline)
}
