"""`make demo`'s workflow end to end (issue #21): synthetic labelled scenes, `terratorch fit` with the
repository's YAML, `vllm-terratorch export`, `vllm serve` with the mission's line, one held-out scene
through `/pooling`. The served prediction must agree with the NDWI rule far above chance, so a
regression in training, export or serving shows up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from vllm_terratorch.testing import demo

pytestmark = pytest.mark.integration


def test_the_fine_tuned_served_model_maps_water_as_the_rule_does(tmp_path):
    summary = demo.run_workflow(tmp_path / "demo-out")
    assert json.loads((tmp_path / "demo-out" / "summary.json").read_text()) == summary
    with rasterio.open(summary["prediction"]) as prediction, rasterio.open(summary["scene"]) as scene:
        assert (prediction.crs, prediction.transform) == (scene.crs, scene.transform)
        predicted, pixels = prediction.read(1), scene.read()
    scores = demo.agreement(predicted, demo_rule(pixels))
    assert scores["agreement"] == pytest.approx(summary["agreement"], abs=1e-4)
    # Chance here: all "not water" agrees on ~53 % of the held-out scene and has IoU 0.
    assert 0.3 < scores["water_fraction_rule"] < 0.7
    assert scores["agreement"] >= 0.9 and scores["water_iou"] >= 0.7, scores
    assert (tmp_path / "demo-out" / "prediction.png").stat().st_size > 10_000


def demo_rule(pixels: np.ndarray) -> np.ndarray:
    """NDWI > 0 by hand (not the generator's helper): McFeeters' water index on GREEN and NIR."""
    green, nir = pixels[1].astype(np.float64), pixels[3].astype(np.float64)
    return ((green - nir) / (green + nir) > 0).astype(np.uint8)
