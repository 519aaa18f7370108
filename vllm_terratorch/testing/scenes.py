"""Whole scenes for the memory test and benchmark of issue #18: a model with coarse tiles, scenes of
any size written block row by block row (never held whole), and a process tree's peak memory."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vllm_terratorch.testing.samples import sample_pretrained_cfg

BLOCK = 512  # rows generated (and written) at a time


def coarse_tile_cfg(tile: int = 512) -> dict[str, Any]:
    """A tiny Prithvi + UperNet segmentation model with `tile`^2 tiles and no overlap: one
    transformer block and 4 decoder channels (~60 ms per 512^2 tile on two CPU cores), so that a
    10000^2 scene (400 tiles) is a CI-sized job."""
    cfg = sample_pretrained_cfg("segmentation", image_size=tile, decoder_channels=4)
    model_args = cfg["model"]["init_args"]["model_args"]
    model_args["backbone_depth"] = 1
    model_args["necks"][0]["indices"] = [0, 0, 0, 0]
    # The strides said: left out, TerraTorch's (and so our) default is 192, overlapping tiles.
    cfg["model"]["init_args"]["tiled_inference_parameters"] = {"h_crop": tile, "w_crop": tile, "h_stride": tile, "w_stride": tile}
    return cfg


def write_large_scene(path: Path, size: int, pattern: np.ndarray) -> Path:
    """A size x size int16 scene tiled like a Sentinel-2 product (512^2 blocks), assembled block row by
    block row from `pattern` (bands, rows, cols; each block row shifted, so rows do not repeat
    exactly), with scattered nodata pixels (-9999). Memory: one block row."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    bands, rows, cols = pattern.shape
    profile = {"driver": "GTiff", "height": size, "width": size, "count": bands, "dtype": "int16", "nodata": -9999,
               "crs": "EPSG:32629", "transform": from_origin(725000.0, 4375000.0, 10.0, 10.0),
               "tiled": True, "blockxsize": 512, "blockysize": 512, "BIGTIFF": "IF_SAFER"}
    row_index = np.arange(BLOCK)
    col_index = np.arange(size) % cols
    with rasterio.open(path, "w", **profile) as target:
        for top in range(0, size, BLOCK):
            height = min(BLOCK, size - top)
            shifted = np.roll(pattern, (top // BLOCK) * 37, axis=2)
            band = shifted[:, (top + row_index[:height]) % rows][:, :, col_index]
            band[:, :: 97, :: 89] = -9999
            target.write(band, window=Window(0, top, size, height))
    return path


def tree_rss(process: Any) -> int:
    """Resident memory of a process and all its descendants, summed (psutil.Process)."""
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command: list[str], log: Path, timeout: float = 1800) -> tuple[int, int]:
    """Run `command` (output to `log`): its return code and the peak over time of its process
    tree's summed RSS, sampled every 50 ms."""
    import psutil

    with log.open("w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        process, peak, stop = psutil.Process(child.pid), 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                try:
                    peak = max(peak, tree_rss(process))
                except psutil.Error:
                    pass
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = child.wait(timeout=timeout)
        finally:
            stop.set()
            sampler.join()
            if child.poll() is None:
                child.kill()
    return code, peak
