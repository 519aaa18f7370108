"""Online load: `/pooling` requests with GeoTIFFs against a real `vllm serve` (loopback only).

Starts the server with the mission's command line on a tiny (or given) model, then for each
concurrency level sends a bounded number of requests (bounded in time too) and records
requests/s, latency percentiles, errors and the server's time split (decode / engine / encode,
from the response's `timings`). Writes `<output>/online-*.json` and `.png`.

    python benchmarks/online.py                                  # tiny model, levels 1,4,16,64
    python benchmarks/online.py --levels 1,8 --requests 32 --scene-size 512

The in-tree stack (vLLM's `Terratorch` + TerraTorch's `terratorch_segmentation` processor) is not
measured on vLLM 0.32: its processor answers every request with HTTP 500 ("asyncio.run() cannot
be called from a running event loop", see STACK.md), so there is no throughput to compare.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_results  # noqa: E402

IN_TREE_NOTE = (
    "not measured: TerraTorch 1.2.10's terratorch_segmentation processor fails every request on "
    "vLLM 0.32 with HTTP 500 (asyncio.run() inside the server's event loop; STACK.md)"
)


def run_level(server: Any, payloads: list[dict[str, Any]], concurrency: int, count: int, time_limit_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    splits: dict[str, list[float]] = {"decode_s": [], "engine_s": [], "encode_s": []}
    errors = 0
    deadline = time.monotonic() + time_limit_s

    def one(index: int) -> None:
        nonlocal errors
        if time.monotonic() > deadline:
            return
        started = time.perf_counter()
        try:
            response = server.pooling(payloads[index % len(payloads)], timeout=300)
            ok = response.status_code == 200
        except Exception:  # noqa: BLE001 - a failed request is counted, not fatal
            ok, response = False, None
        latencies.append(time.perf_counter() - started)
        if not ok:
            errors += 1
            return
        for key, value in (response.json()["data"].get("timings") or {}).items():
            splits.setdefault(key, []).append(value)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    done = len(latencies)
    return {
        "concurrency": concurrency,
        "requests": done,
        "errors": errors,
        "requests_per_s": (done - errors) / wall,
        "latency_s": summary(latencies) if latencies else None,
        "server_split_s": {key: summary(values) for key, values in splits.items() if values},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="servable model folder (default: a tiny Prithvi segmentation model)")
    parser.add_argument("--levels", default="1,4,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most")
    parser.add_argument("--scene-size", type=int, default=128, help="scene height = width (pixels)")
    parser.add_argument("--scenes", type=int, default=8, help="distinct scenes sent round-robin")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/.models/online"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("serve_args", nargs="*", help="extra `vllm serve` arguments (after --)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from vllm_terratorch.testing.launcher import DOCUMENTED, Server
    from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or work / "model"
    if args.model is None and not (model / "config.json").is_file():
        write_model_folder(model, sample_pretrained_cfg("segmentation"))
    scenes = [write_sample_geotiff(work / f"scene{i}.tif", args.scene_size, args.scene_size, seed=i) for i in range(args.scenes)]
    payloads = [
        {"data": base64.b64encode(p.read_bytes()).decode(), "data_format": "b64_json", "out_data_format": "b64_json", "image_format": "geoTiff"}
        for p in scenes
    ]
    levels = [int(x) for x in args.levels.split(",") if x]
    results: dict[str, Any] = {
        "title": f"online /pooling, {args.scene_size}px scenes",
        "model": str(model), "scene_size": args.scene_size, "machine": machine(),
        "plot_metric": "requests_per_s", "paths": {}, "levels": [], "in_tree": IN_TREE_NOTE,
    }
    with Server(model, [*DOCUMENTED, *args.serve_args], work / "server.log") as server:
        assert urlsplit(server.url).hostname == "127.0.0.1"  # loopback only
        server.wait_ready()
        run_level(server, payloads, 1, 2, 60)  # warm-up
        for level in tqdm(levels, desc="concurrency levels"):
            results["levels"].append(run_level(server, payloads, level, args.requests, args.time_limit))
    for entry in results["levels"]:
        rate = entry["requests_per_s"]
        results["paths"][f"c={entry['concurrency']}"] = {"requests_per_s": summary([rate])}
        p = entry["latency_s"] or {}
        print(f"concurrency {entry['concurrency']:>3}: {rate:7.2f} req/s  p50 {p.get('p50', 0):.3f}s  "
              f"p95 {p.get('p95', 0):.3f}s  p99 {p.get('p99', 0):.3f}s  errors {entry['errors']}")
    json_path, png_path = write_results(results, args.output, f"online-{args.scene_size}px")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
