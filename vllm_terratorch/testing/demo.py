"""`make demo`: build a small Prithvi segmentation model, serve it, segment a GeoTIFF.

Everything is local and offline: the model is the real Prithvi-EO-2.0 architecture (tiny
configuration, random weights) with the mission's UperNet head, saved as a Lightning checkpoint;
the scene is a synthetic Sentinel-2-like GeoTIFF. The server is started with the mission
document's `vllm serve` line, and the request is the mission document's payload (with a local
path instead of a URL). Outputs: the prediction GeoTIFF (same georeference as the scene) and a
PNG preview of scene and prediction side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def write_preview(scene: Path, prediction: Path, target: Path) -> None:
    """RGB of the scene beside the predicted class mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio

    with rasterio.open(scene) as source:
        rgb = source.read([3, 2, 1]).astype(np.float32)
    rgb = np.clip(rgb.transpose(1, 2, 0) / np.percentile(rgb, 99), 0, 1)
    with rasterio.open(prediction) as source:
        mask = source.read(1)
    figure, axes = plt.subplots(1, 2, figsize=(10, 5))
    axes[0].imshow(rgb)
    axes[0].set_title(f"scene ({scene.name})")
    axes[1].imshow(np.ma.masked_equal(mask, 255), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    axes[1].set_title("predicted classes")
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)


def run(output: Path, size: int, height: int, width: int) -> dict[str, object]:
    from vllm_terratorch.testing.launcher import DOCUMENTED, Server
    from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff

    output = output.resolve()
    model, media, predictions = output / "model", output / "input", output / "predictions"
    for folder in (media, predictions):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not (model / "config.json").is_file():
        print(f"[demo] building a Prithvi-EO-2.0 (tiny) + UperNet segmentation model in {model}", flush=True)
        write_model_folder(model, sample_pretrained_cfg("segmentation", image_size=size))
    scene = write_sample_geotiff(media / "scene.tif", height, width, seed=7)
    print(f"[demo] scene {scene} ({height}x{width}, 6 bands); starting vllm serve (about a minute on CPU)", flush=True)
    env = {"VLLM_TERRATORCH_IO_CONFIG": json.dumps({"output_path": str(predictions)})}
    args = [*DOCUMENTED, "--allowed-local-media-path", str(media)]
    with Server(model, args, output / "server.log", env) as server:
        server.wait_ready()
        ready = time.monotonic()
        payload = {"data": str(scene), "data_format": "path", "out_data_format": "path", "image_format": "geoTiff"}
        response = server.pooling(payload)
        answered = time.monotonic()
    if response.status_code != 200:
        raise SystemExit(f"[demo] request failed with HTTP {response.status_code}: {response.text}")
    prediction = Path(response.json()["data"]["data"])
    preview = output / "prediction.png"
    write_preview(scene, prediction, preview)
    summary = {
        "model": str(model),
        "scene": str(scene),
        "prediction": str(prediction),
        "preview": str(preview),
        "server_log": str(output / "server.log"),
        "server_start_s": round(ready - started, 1),
        "request_s": round(answered - ready, 2),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_terratorch.testing.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo-out"), help="folder for model, scene and results")
    parser.add_argument("--size", type=int, default=64, help="model input size (pixels)")
    parser.add_argument("--height", type=int, default=200, help="scene height (pixels)")
    parser.add_argument("--width", type=int, default=300, help="scene width (pixels)")
    args = parser.parse_args(argv)
    summary = run(args.output, args.size, args.height, args.width)
    print(json.dumps(summary, indent=2))
    print(f"[demo] done: prediction {summary['prediction']}, preview {summary['preview']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
