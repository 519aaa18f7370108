"""Whole scenes through `vllm-terratorch predict` (issue #18): time and peak memory against scene size.

Each size is a fresh `predict` process on one generated scene (6-band int16, written block row by
block row, deleted after its run) with a tiny model of coarse tiles (testing/scenes.py). Measured:
the pipeline's wall time (summary.json, engine start-up excluded) as seconds per megapixel, and the
process tree's peak resident memory (sampled every 50 ms, summed over predict and its workers).
Streamed runs force streaming (`--stream-pixels 1`; by default only scenes over 4096^2 stream) and
should give flat memory and linear time; `--stream-pixels 0` (every scene held whole, the pre-#18
path) is the comparison, run where it fits in memory, and the two outputs are compared pixel by pixel.

    .venv/bin/python benchmarks/scenes.py --sizes 2048,8192,16384 --whole-up-to 8192
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from vllm_terratorch.testing.samples import write_model_folder, write_sample_geotiff  # noqa: E402
from vllm_terratorch.testing.scenes import coarse_tile_cfg, run_measured, write_large_scene  # noqa: E402

MiB = 1024**2


def run_size(work: Path, model: Path, pattern: Any, size: int, stream: bool, dtype: str) -> dict[str, Any]:
    scenes = work / f"scenes-{size}"
    scenes.mkdir()
    write_large_scene(scenes / "scene.tif", size, pattern)
    out = work / f"out-{size}-{'stream' if stream else 'whole'}"
    command = [sys.executable, "-m", "vllm_terratorch.predict.main", str(model), "--input", str(scenes), "--output",
               str(out), "--dtype", dtype, "--no-progress", "--stream-pixels", "1" if stream else "0"]
    log = work / f"predict-{size}-{'stream' if stream else 'whole'}.log"
    code, peak = run_measured(command, log)
    shutil.rmtree(scenes)
    result: dict[str, Any] = {"size": size, "megapixels": size * size / 1e6, "streamed": stream, "returncode": code,
                              "peak_rss_bytes": peak, "peak_rss_mib": round(peak / MiB, 1)}
    if code != 0:
        result["error"] = log.read_text()[-2000:]
        return result
    summary = json.loads((out / "summary.json").read_text())
    totals = summary["totals"]
    result |= {
        "tiles": totals["tiles"],
        "chunk_tiles": summary["chunk_tiles"],
        "wall_s": totals["wall_seconds"],
        "total_s": summary["total_seconds"],
        "s_per_megapixel": round(totals["wall_seconds"] / (size * size / 1e6), 4),
        "engine_busy_fraction": totals["engine_busy_fraction"],
        "summary_peak_rss_bytes": totals["peak_rss_bytes"],
        "output": str(out / "scene_pred.tif"),
    }
    return result


def agreement(first: str, second: str) -> float:
    """Fraction of equal pixels of two class masks, read block row by block row."""
    import rasterio
    from rasterio.windows import Window

    equal = 0
    with rasterio.open(first) as a, rasterio.open(second) as b:
        for top in range(0, a.height, 512):
            window = Window(0, top, a.width, min(512, a.height - top))
            equal += int((a.read(window=window) == b.read(window=window)).sum())
        return equal / (a.width * a.height)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stream, label, style in ((True, "streamed", "o-"), (False, "held whole (--stream-pixels 0)", "s--")):
        runs = [r for r in results["runs"] if r["streamed"] == stream and r["returncode"] == 0]
        if runs:
            sizes = [r["size"] for r in runs]
            left.plot(sizes, [r["s_per_megapixel"] for r in runs], style, label=label)
            right.plot(sizes, [r["peak_rss_mib"] for r in runs], style, label=label)
    left.set(xlabel="scene size (pixels per side)", ylabel="seconds per megapixel", title="time (pipeline, start-up excluded)")
    right.set(xlabel="scene size (pixels per side)", ylabel="peak RSS of the process tree (MiB)", title="memory")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    right.legend()
    figure.suptitle(results["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,8192,16384", help="scene sizes (pixels per side), comma-separated")
    parser.add_argument("--whole-up-to", type=int, default=0, help="also run sizes up to this with every scene held whole")
    parser.add_argument("--tile", type=int, default=512, help="the model's tile size")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.sizes.split(",")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="scenes-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import rasterio

    model = write_model_folder(work / "model", coarse_tile_cfg(args.tile), seed=4)
    with rasterio.open(write_sample_geotiff(work / "pattern.tif", 1000, 1000, seed=5)) as source:
        pattern = source.read()
    runs = [run_size(work, model, pattern, size, True, args.dtype) for size in sizes]
    runs += [run_size(work, model, pattern, size, False, args.dtype) for size in sizes if size <= args.whole_up_to]
    for whole in [run for run in runs if not run["streamed"] and "output" in run]:
        streamed = next(run for run in runs if run["streamed"] and run["size"] == whole["size"])
        if "output" in streamed:
            streamed["agreement_with_whole"] = whole["agreement_with_streamed"] = agreement(streamed["output"], whole["output"])
    for run in runs:
        if "output" in run:
            shutil.rmtree(Path(run.pop("output")).parent)
    stem = f"scenes-tile{args.tile}-{args.dtype}"
    results = {
        "title": f"predict on one scene, tiny Prithvi + UperNet, {args.tile}^2 tiles, {args.dtype}",
        "machine": machine(),
        "command": " ".join(["benchmarks/scenes.py", *(argv if argv is not None else sys.argv[1:])]),
        "runs": runs,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.output / f"{stem}.png")
    for run in runs:
        print(json.dumps({k: run.get(k) for k in ("size", "streamed", "returncode", "s_per_megapixel", "peak_rss_mib",
                                                   "agreement_with_whole")}))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(run["returncode"] == 0 for run in runs if run["streamed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
