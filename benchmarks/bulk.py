"""Bulk inference on a folder of scenes: `vllm-terratorch predict` against `terratorch predict`.

The tool users have today for a folder of scenes is TerraTorch's LightningCLI `predict` with the
fine-tune's YAML and checkpoint (tiled inference from the YAML's `tiled_inference_parameters`).
This script runs every tool on the same checkpoint and the same folder of scenes (mixed sizes
around 1k², the demo's synthetic Sentinel-2-like land cover, testing/landcover.py), each as a user
runs it, in its own process:

- `terratorch`: `terratorch predict -c YAML --ckpt_path CKPT --data.init_args.predict_data_root
  SCENES --predict_output_dir OUT` (batch size 1: scenes of different sizes do not collate);
- `ours`: `vllm-terratorch predict MODEL --input SCENES --output OUT` on the folder that
  `vllm-terratorch export` makes of the same YAML and checkpoint;
- `ours-ray`: the same with `--ray --replicas N`;
- `torch`: a plain PyTorch loop (the limit): the Lightning task loaded from the checkpoint, each
  scene read, normalised, cut into the same tiles `ours` sends, forwarded in batches under
  `inference_mode` at every core, stitched and written.

Each tool's wall time is the whole command (imports, model or engine start, every scene). Each is
also run once on a single small scene first: wall(all) - wall(one) is its time for the scenes
without its start-up, the `steady` rates. The class masks are compared with `ours`' pixel by
pixel (`agreement_with_ours`). Every path gives the network the same inputs: the demo YAML's
fine-tune trains on a generic datamodule, which gives it no coordinates, so `ours` is exported
without location_coords (`parity_input`, what `vllm-terratorch config` advises), as `terratorch
predict` and `torch` pass none; and `ours` tiles as TerraTorch's `tiled_inference` does (the
config's `tiled_inference_parameters`, io/tiling.py), as does `torch`, with our tiling code.
Writes `<output>/bulk-*.json` and `.png`.

    python benchmarks/bulk.py                                   # 12 scenes, about 1k², every path
    python benchmarks/bulk.py --sizes 2048 --scenes 4 --paths terratorch,ours
    python benchmarks/bulk.py --config my.yaml --checkpoint my.ckpt --scene-dir my_scenes/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_results  # noqa: E402

PATHS = ("terratorch", "ours", "ours-ray", "torch")
DEFAULT_SIZES = "1024,1280x768,896x1152,1000,768x1024,1152"
TILE_BATCH = 16  # the torch loop's tiles per forward: TerraTorch's tiled_inference default


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024,768x1280' -> [(1024, 1024), (768, 1280)] (height x width)."""
    sizes = []
    for part in text.split(","):
        height, _, width = part.strip().partition("x")
        sizes.append((int(height), int(width or height)))
    return sizes


def write_scenes(folder: Path, sizes: list[tuple[int, int]], count: int, first_seed: int = 2000) -> list[Path]:
    """`count` scenes cycling through `sizes`, named as TerraTorch's generic datamodule greps them."""
    from vllm_terratorch.testing.landcover import write_scene

    written = []
    for k in range(count):
        height, width = sizes[k % len(sizes)]
        written.append(write_scene(folder / f"scene{k:03d}_img.tif", height, first_seed + k, width=width)[0])
    return written


def run_step(command: list[str], log: Path, what: str) -> float:
    """Run one tool as its user would (its own process, output in `log`); its wall time in seconds."""
    started = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{what} failed (exit {result.returncode}); the end of {log}:\n{tail}")
    return time.perf_counter() - started


def fit_checkpoint(config: Path, work: Path, epochs: int) -> Path:
    """A short `terratorch fit` of `config` on the demo's labelled 128² scenes (reused when present):
    the same kind of checkpoint a user's fine-tune produces."""
    from vllm_terratorch.testing.landcover import write_scene_set

    run_dir = work / "training"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        return checkpoint
    scenes = work / "training-scenes"
    write_scene_set(scenes, 128, 16, 2)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[bulk] terratorch fit --config {config.name} ({epochs} epochs)", flush=True)
    run_step([sys.executable, "-m", "terratorch", "fit", "--config", str(config),
              *(f"--data.init_args.{split}_data_root={scenes / folder}" for split, folder in (("train", "train"), ("val", "val"), ("test", "val"))),
              f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={run_dir}"], work / "fit.log", "terratorch fit")
    return checkpoint


COORDINATES = ("location_coords", "temporal_coords")


def parity_input(config: Path) -> list[str]:
    """`-i SPEC` for `vllm-terratorch export` when the fine-tune never saw coordinates: the input
    spec `config` infers, less the coordinates. A _tl backbone's export declares location_coords
    (as upstream's configs do), but a YAML that trains on a generic datamodule gave the network
    none, and `terratorch predict` passes none: the same inputs are what `config` advises for the
    same outputs. Nothing (export infers the spec itself) otherwise."""
    import yaml

    from vllm_terratorch.cli.generate import infer_input_spec, trains_without_coordinates

    document = yaml.safe_load(config.read_text())
    if not trains_without_coordinates(document):
        return []
    spec, _ = infer_input_spec(document)
    if not set(COORDINATES) & set(spec["data"]):
        return []
    spec["data"] = {name: entry for name, entry in spec["data"].items() if name not in COORDINATES}
    return ["-i", json.dumps(spec)]


def tool_command(path: str, scenes: Path, out: Path, config: Path, checkpoint: Path, model: Path, replicas: int) -> list[str]:
    """The command line of one path (`torch` runs this script's own loop in a child process)."""
    if path == "terratorch":
        return [sys.executable, "-m", "terratorch", "predict", "-c", str(config), "--ckpt_path", str(checkpoint),
                f"--data.init_args.predict_data_root={scenes}", "--data.init_args.batch_size=1",
                f"--predict_output_dir={out}", f"--trainer.default_root_dir={out.parent / (out.name + '-run')}"]
    if path == "torch":
        return [sys.executable, __file__, "--torch-loop", str(scenes), str(out), "--config", str(config),
                "--checkpoint", str(checkpoint), "--model-dir", str(model)]
    ours = [sys.executable, "-m", "vllm_terratorch.cli.main", "predict", str(model), "--input", str(scenes),
            "--output", str(out), "--no-progress"]
    return [*ours, "--ray", "--replicas", str(replicas)] if path == "ours-ray" else ours


def torch_loop(scenes: Path, out: Path, config: Path, checkpoint: Path, model_dir: Path) -> int:
    """The plain PyTorch loop a user would write: returns 0; writes `<out>/timing.json`."""
    import rasterio
    import torch
    import yaml
    from terratorch.tasks import SemanticSegmentationTask

    from vllm_terratorch.io.tiling import extract_tiles, plan_tiles, stitch, tiling_from_config

    started = time.perf_counter()
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    scale = float(data.get("constant_scale", 1.0))
    means = np.asarray(data["means"], np.float32)[:, None, None]
    stds = np.asarray(data["stds"], np.float32)[:, None, None]
    task = SemanticSegmentationTask.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    # The same tiles `ours` sends: the exported model's tiling (the YAML's tiled_inference_parameters).
    cfg = json.loads((model_dir / "config.json").read_text())["pretrained_cfg"]
    spec_hw = tuple(cfg["input"]["data"]["pixel_values"]["shape"][-2:])
    tiling = tiling_from_config(cfg["model"]["init_args"].get("tiled_inference_parameters"), spec_hw)
    out.mkdir(parents=True, exist_ok=True)
    loaded = time.perf_counter()
    forward_s = 0.0
    with torch.inference_mode():
        for scene in sorted(scenes.glob("*.tif")):
            with rasterio.open(scene) as source:
                image = (source.read().astype(np.float32) * scale - means) / stds
                profile = source.profile
            plan = plan_tiles(*image.shape[1:], tiling)
            tiles = torch.from_numpy(extract_tiles(image, plan))
            tick = time.perf_counter()
            logits = torch.cat([task.model(tiles[i : i + TILE_BATCH]).output for i in range(0, len(tiles), TILE_BATCH)])
            forward_s += time.perf_counter() - tick
            classes = stitch(logits, plan).argmax(axis=0).astype(np.uint8)
            profile.update(count=1, dtype="uint8", nodata=255, compress="deflate")
            with rasterio.open(out / f"{scene.stem}_pred.tif", "w", **profile) as target:
                target.write(classes[None])
    timing = {"load_s": loaded - started, "loop_s": time.perf_counter() - loaded, "forward_s": forward_s}
    (out / "timing.json").write_text(json.dumps(timing))
    return 0


def read_classes(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as source:
        return source.read(1).astype(np.int32)


def agreement(outputs: Path, reference: Path, scenes: list[Path]) -> dict[str, float]:
    """Fraction of pixels whose class equals the reference's, over all scenes (and the worst scene)."""
    equal = total = 0
    worst = 1.0
    for scene in scenes:
        mine, theirs = read_classes(outputs / f"{scene.stem}_pred.tif"), read_classes(reference / f"{scene.stem}_pred.tif")
        if mine.shape != theirs.shape:
            raise RuntimeError(f"{scene.name}: output shape {mine.shape} differs from the reference's {theirs.shape}")
        same = int((mine == theirs).sum())
        equal, total, worst = equal + same, total + mine.size, min(worst, same / mine.size)
    return {"pixels": equal / total, "worst_scene": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="scene sizes cycled through, HEIGHTxWIDTH or SIDE")
    parser.add_argument("--scenes", type=int, default=12, help="number of scenes")
    parser.add_argument("--scene-dir", type=Path, help="use these scenes (*_img.tif) instead of writing new ones")
    parser.add_argument("--config", type=Path, help="TerraTorch YAML (default: the demo's, tiny Prithvi-EO-2.0 + UperNet)")
    parser.add_argument("--checkpoint", type=Path, help="Lightning checkpoint of --config (default: a short terratorch fit)")
    parser.add_argument("--fit-epochs", type=int, default=2, help="epochs of the default checkpoint's fit")
    parser.add_argument("--replicas", type=int, default=2, help="engine actors of ours-ray")
    parser.add_argument("--no-startup-run", action="store_true", help="skip the one-scene runs (no steady rates)")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/.models/bulk"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--torch-loop", nargs=2, type=Path, metavar=("SCENES", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_loop:
        return torch_loop(*args.torch_loop, args.config, args.checkpoint, args.model_dir)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := sorted(set(paths) - set(PATHS)):
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    from vllm_terratorch.testing.demo import YAML
    from vllm_terratorch.testing.landcover import write_scene

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = (args.config or YAML).resolve()
    checkpoint = args.checkpoint.resolve() if args.checkpoint else fit_checkpoint(config, work, args.fit_epochs)
    model = work / "model"
    run_step([sys.executable, "-m", "vllm_terratorch.cli.main", "export", "--ttconfig", str(config),
              "--checkpoint", str(checkpoint), "--force", *parity_input(config), str(model)], work / "export.log",
             "vllm-terratorch export")
    if args.scene_dir:
        scene_dir = args.scene_dir.resolve()
        scenes = sorted(scene_dir.glob("*_img.tif"))
    else:
        scene_dir = work / "scenes"
        for old in scene_dir.glob("*.tif"):
            old.unlink()
        scenes = write_scenes(scene_dir, parse_sizes(args.sizes), args.scenes)
    one = work / "one-scene"
    write_scene(one / "scene000_img.tif", 256, 1)
    pixels = 0
    for scene in scenes:
        import rasterio

        with rasterio.open(scene) as source:
            pixels += source.width * source.height
    results: dict[str, Any] = {
        "title": f"bulk predict, {len(scenes)} scenes ({pixels / 1e6:.1f} MPix)", "machine": machine(),
        "config": str(config), "checkpoint": str(checkpoint), "model": str(model), "plot_metric": "mpix_per_s",
        "scenes": [scene.name for scene in scenes], "megapixels": pixels / 1e6, "paths": {},
    }
    for path in paths:
        out = work / "out" / path
        entry: dict[str, Any] = {"command": tool_command(path, scene_dir, out, config, checkpoint, model, args.replicas)}
        try:
            if not args.no_startup_run:
                entry["one_scene_wall_s"] = run_step(tool_command(path, one, work / "out" / f"{path}-one", config, checkpoint,
                                                                  model, args.replicas), work / f"{path}-one.log", path)
            print(f"[bulk] {path}: {len(scenes)} scenes", flush=True)
            wall = run_step(entry["command"], work / f"{path}.log", path)
        except RuntimeError as error:
            entry["error"] = str(error)
            results["paths"][path] = entry
            print(f"[bulk] {path} failed: {error}", flush=True)
            continue
        entry.update(wall_s=wall, scenes_per_s=summary([len(scenes) / wall]), mpix_per_s=summary([pixels / 1e6 / wall]))
        if "one_scene_wall_s" in entry and wall > entry["one_scene_wall_s"]:
            steady = wall - entry["one_scene_wall_s"]
            entry.update(steady_s=steady, steady_scenes_per_s=len(scenes) / steady, steady_mpix_per_s=pixels / 1e6 / steady)
        if path == "torch":
            entry["loop"] = json.loads((out / "timing.json").read_text())
            entry["forward_only_mpix_per_s"] = pixels / 1e6 / entry["loop"]["forward_s"]
        results["paths"][path] = entry
    done = [p for p in paths if "error" not in results["paths"][p]]
    if "ours" in done:
        for path in done:
            if path != "ours":
                results["paths"][path]["agreement_with_ours"] = agreement(work / "out" / path, work / "out" / "ours", scenes)
        for path in done:
            if path != "ours":
                # How many times faster ours is than this path: its time over ours.
                speed = {"end_to_end": results["paths"][path]["wall_s"] / results["paths"]["ours"]["wall_s"]}
                results.setdefault("ours_speed_vs", {})[path] = speed
                if "steady_s" in results["paths"][path] and "steady_s" in results["paths"]["ours"]:
                    results["ours_speed_vs"][path]["steady"] = results["paths"][path]["steady_s"] / results["paths"]["ours"]["steady_s"]
    for path in paths:
        entry = results["paths"][path]
        if "error" in entry:
            print(f"{path:>11}: error")
            continue
        steady = f"  steady {entry['steady_mpix_per_s']:6.2f} MPix/s" if "steady_mpix_per_s" in entry else ""
        agree = f"  agreement with ours {entry['agreement_with_ours']['pixels']:.4%}" if "agreement_with_ours" in entry else ""
        print(f"{path:>11}: {entry['wall_s']:7.1f} s  {entry['mpix_per_s']['median']:6.2f} MPix/s{steady}{agree}")
    json_path, png_path = write_results(results, args.output, f"bulk-{len(scenes)}scenes")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
