"""`make demo`: the user's workflow, offline: fine-tune with TerraTorch, export, serve, predict.

1. A synthetic but structured scene set (testing/landcover.py): 6-band Sentinel-2-like
   reflectances with lakes, rivers, fields and towns, labelled water / not water by the NDWI rule.
2. `terratorch fit` with `examples/finetune/water-tiny-prithvi.yaml` (a tiny Prithvi-EO-2.0 +
   UperNet, a few epochs on CPU): a Lightning checkpoint, as a user's fine-tune produces one.
3. `vllm-terratorch export` of that checkpoint into a servable folder, `vllm serve` with the
   mission document's command line, and a held-out scene through `/pooling` (the mission's
   payload, a local path instead of a URL).
4. `prediction.png`: the scene (RGB), the rule's mask and the served prediction side by side, with
   the pixel agreement and the water IoU in the title; `summary.json` with the numbers.

`make demo-quick` (`--quick`) is the older fast path: a random-weights model, no training, the
plumbing only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _rgb(scene: Path) -> np.ndarray:
    """The scene's RED, GREEN, BLUE bands, stretched to its 99th percentile."""
    import rasterio

    with rasterio.open(scene) as source:
        rgb = source.read([3, 2, 1]).astype(np.float32)
    return np.clip(rgb.transpose(1, 2, 0) / np.percentile(rgb, 99), 0, 1)


def write_preview(scene: Path, prediction: Path, target: Path) -> None:
    """RGB of the scene beside the predicted class mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio

    rgb = _rgb(scene)
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


# The fine-tuning YAML (also examples/finetune/water-tiny-prithvi.yaml in the repository, to copy).
YAML = Path(__file__).resolve().with_name("water-tiny-prithvi.yaml")
TRAIN_SCENES, VAL_SCENES, CHIP, HELD_OUT = 32, 4, 128, 256
HELD_OUT_SEED = 999


def agreement(prediction: np.ndarray, rule: np.ndarray) -> dict[str, float]:
    """Pixel agreement with the rule's mask, and the water class's intersection over union."""
    both, either = ((prediction == 1) & (rule == 1)).sum(), ((prediction == 1) | (rule == 1)).sum()
    return {"agreement": float((prediction == rule).mean()), "water_iou": float(both / max(either, 1)),
            "water_fraction_rule": float(rule.mean()), "water_fraction_predicted": float((prediction == 1).mean())}


def write_comparison(scene: Path, rule: np.ndarray, prediction: np.ndarray, scores: dict[str, float], target: Path) -> None:
    """Scene RGB, the NDWI rule's mask and the served prediction side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    axes[0].imshow(_rgb(scene))
    axes[0].set_title("held-out scene (RGB)")
    for axis, mask, title in ((axes[1], rule, "water by the NDWI rule"), (axes[2], prediction, "served prediction")):
        axis.imshow(np.ma.masked_equal(mask, 255), cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
        axis.set_title(title)
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(f"tiny Prithvi-EO-2.0 + UperNet fine-tuned with TerraTorch, served by vLLM: "
                    f"{scores['agreement']:.1%} pixel agreement, water IoU {scores['water_iou']:.2f}")
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)


def serve_and_ask(model: Path, scene: Path, output: Path) -> tuple[Path, float, float]:
    """`vllm serve` with the mission document's line (local files from the scene's folder, outputs
    under `output/predictions`), the mission's payload for the scene; the prediction's path and
    when the server was ready and answered (time.monotonic)."""
    from vllm_terratorch.testing.launcher import DOCUMENTED, Server

    predictions = output / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    env = {"VLLM_TERRATORCH_IO_CONFIG": json.dumps({"output_path": str(predictions)})}
    with Server(model, [*DOCUMENTED, "--allowed-local-media-path", str(scene.parent)], output / "server.log", env) as server:
        server.wait_ready()
        ready = time.monotonic()
        payload = {"data": str(scene), "data_format": "path", "out_data_format": "path", "image_format": "geoTiff"}
        response = server.pooling(payload)
        answered = time.monotonic()
    if response.status_code != 200:
        raise SystemExit(f"[demo] request failed with HTTP {response.status_code}: {response.text}")
    return Path(response.json()["data"]["data"]), ready, answered


def _step(command: list[str], log: Path, what: str) -> None:
    """One workflow step as a user runs it (its own process), its output in `log`."""
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"[demo] {what} failed (exit {result.returncode}); see {log}")


def run_workflow(output: Path) -> dict[str, object]:
    """Scenes -> `terratorch fit` -> `vllm-terratorch export` -> `vllm serve` -> one held-out scene."""
    import rasterio

    from vllm_terratorch.testing.landcover import write_scene, write_scene_set

    output = output.resolve()
    scenes, run_dir, model, media = (output / name for name in ("scenes", "training", "model", "input"))
    media.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"[demo] writing {TRAIN_SCENES} + {VAL_SCENES} labelled {CHIP}x{CHIP} scenes to {scenes}", flush=True)
    write_scene_set(scenes, CHIP, TRAIN_SCENES, VAL_SCENES)
    scene, rule = write_scene(media / "heldout.tif", HELD_OUT, HELD_OUT_SEED)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    print(f"[demo] terratorch fit --config {YAML.name} (a few epochs on CPU)", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.unlink(missing_ok=True)
    _step([sys.executable, "-m", "terratorch", "fit", "--config", str(YAML),
           *(f"--data.init_args.{split}_data_root={scenes / folder}" for split, folder in (("train", "train"), ("val", "val"), ("test", "val"))),
           f"--trainer.default_root_dir={run_dir}"], output / "fit.log", "terratorch fit")
    fitted = time.monotonic()
    print(f"[demo] vllm-terratorch export --checkpoint {checkpoint} {model}", flush=True)
    _step([sys.executable, "-m", "vllm_terratorch.cli.main", "export", "--ttconfig", str(YAML), "--checkpoint", str(checkpoint),
           "--force", str(model)], output / "export.log", "vllm-terratorch export")
    print("[demo] starting vllm serve with the mission's command line (about a minute on CPU)", flush=True)
    prediction_path, ready, answered = serve_and_ask(model, scene, output)
    with rasterio.open(prediction_path) as source:
        prediction = source.read(1)
    scores = agreement(prediction, rule)
    preview = output / "prediction.png"
    write_comparison(scene, rule, prediction, scores, preview)
    summary = {
        "workflow": "scenes -> terratorch fit -> vllm-terratorch export -> vllm serve -> /pooling",
        "yaml": str(YAML), "checkpoint": str(checkpoint), "model": str(model), "scene": str(scene),
        "prediction": str(prediction_path), "preview": str(preview), "server_log": str(output / "server.log"),
        **{name: round(value, 4) for name, value in scores.items()},
        "fit_s": round(fitted - started, 1), "server_start_s": round(ready - fitted, 1), "request_s": round(answered - ready, 2),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(output: Path, size: int, height: int, width: int) -> dict[str, object]:
    from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff

    output = output.resolve()
    model, media = output / "model", output / "input"
    media.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not (model / "config.json").is_file():
        print(f"[demo] building a Prithvi-EO-2.0 (tiny) + UperNet segmentation model in {model}", flush=True)
        write_model_folder(model, sample_pretrained_cfg("segmentation", image_size=size))
    scene = write_sample_geotiff(media / "scene.tif", height, width, seed=7)
    print(f"[demo] scene {scene} ({height}x{width}, 6 bands); starting vllm serve (about a minute on CPU)", flush=True)
    prediction, ready, answered = serve_and_ask(model, scene, output)
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
    parser.add_argument("--quick", action="store_true", help="random weights, no training: the plumbing only (make demo-quick)")
    parser.add_argument("--size", type=int, default=64, help="--quick: model input size (pixels)")
    parser.add_argument("--height", type=int, default=200, help="--quick: scene height (pixels)")
    parser.add_argument("--width", type=int, default=300, help="--quick: scene width (pixels)")
    args = parser.parse_args(argv)
    summary = run(args.output, args.size, args.height, args.width) if args.quick else run_workflow(args.output)
    print(json.dumps(summary, indent=2))
    extra = f", {summary['agreement']:.1%} agreement with the NDWI rule" if "agreement" in summary else ""
    print(f"[demo] done: prediction {summary['prediction']}, preview {summary['preview']}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
