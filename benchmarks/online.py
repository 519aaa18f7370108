"""Online load: `/pooling` requests with GeoTIFFs against a real `vllm serve` (loopback only).

Starts the server with the mission's command line on a tiny (or given) model, then for each
concurrency level sends a bounded number of requests (bounded in time too) and records
requests/s, latency percentiles, errors and the server's time split (decode / engine / encode,
from the response's `timings`). Each level also records, on the server's side (server_meters.py):
the engine's busy fraction and tiles per forward (measured in the engine process), the CPU seconds
of the API server, the engine core and this client, and the latency of GET /health probed every
50 ms (a decode or tiling that blocked the server's event loop would show there). `--mix` then runs
a realistic mix (online_mix.py): scenes of several sizes 256²..2048², half sent as URLs (served by
a loopback HTTP server here), half as base64, each request's time split into decode /
queue+engine / encode / outside the IO processor. Writes `<output>/online-*.json` and `.png`.

    python benchmarks/online.py                                  # tiny model, levels 1,4,16,64
    python benchmarks/online.py --levels 1,8 --requests 32 --scene-size 512
    python benchmarks/online.py --levels 16 --mix                # + the mix at concurrency 2 and 8

The in-tree stack (vLLM's `Terratorch` + TerraTorch's `terratorch_segmentation` processor) is not
measured on vLLM 0.32: its processor answers every request with HTTP 500 ("asyncio.run() cannot
be called from a running event loop", see STACK.md), so there is no throughput to compare.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_results  # noqa: E402
from online_load import Answer, Payload, b64_request, send_all  # noqa: E402
from server_meters import HealthProbe, ServerMeters, meter_environment, probe_for  # noqa: E402

IN_TREE_NOTE = (
    "not measured: TerraTorch 1.2.10's terratorch_segmentation processor fails every request on "
    "vLLM 0.32 with HTTP 500 (asyncio.run() inside the server's event loop; STACK.md)"
)
SPLIT_KEYS = ("decode_s", "engine_s", "encode_s")


def measured_level(server: Any, meters: ServerMeters, payloads: Sequence[Payload], concurrency: int, count: int,
                   time_limit_s: float, describe: Callable[[list[Answer]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One level: the client's view (rate, latency, the server's `timings`) and the server's
    (busy fraction, CPU, /health latency over the same window)."""
    with HealthProbe(server.url) as probe:
        before = meters.snapshot()
        with probe.counting():
            answers, wall = send_all(server.url, payloads, concurrency, count, time_limit_s)
        after = meters.snapshot()
    good = [a for a in answers if a.ok]
    splits = {key: [a.timings[key] for a in good if key in a.timings] for key in SPLIT_KEYS}
    level = {
        "concurrency": concurrency,
        "requests": len(answers),
        "errors": len(answers) - len(good),
        "requests_per_s": len(good) / wall,
        "wall_s": wall,
        "latency_s": summary([a.latency_s for a in answers]) if answers else None,
        "server_split_s": {key: summary(values) for key, values in splits.items() if values},
        "server": ServerMeters.difference(before, after, wall),
        "health_probe": probe.result,
    }
    if describe is not None:
        level |= describe(answers)
    return level


def print_level(name: str, entry: dict[str, Any]) -> None:
    p = entry["latency_s"] or {}
    server, probe = entry["server"], (entry["health_probe"].get("latency_s") or {})
    cores = server.get("cores_used", {})
    print(f"{name} concurrency {entry['concurrency']:>3}: {entry['requests_per_s']:7.2f} req/s  p50 {p.get('p50', 0):.3f}s  "
          f"p95 {p.get('p95', 0):.3f}s  p99 {p.get('p99', 0):.3f}s  errors {entry['errors']}  "
          f"engine busy {server.get('engine_busy_fraction', float('nan')):.0%} ({server.get('tiles_per_forward', 0):.1f} tiles/forward)  "
          f"cores api {cores.get('api_server', 0):.2f} core {cores.get('engine_core', 0):.2f} worker {cores.get('worker', 0):.2f} "
          f"client {cores.get('client', 0):.2f} others {cores.get('rest_of_machine', 0):.2f}  "
          f"/health p50 {probe.get('p50', 0) * 1e3:.1f} ms p95 {probe.get('p95', 0) * 1e3:.1f} ms max {probe.get('max', 0) * 1e3:.1f} ms")


def levels_of(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="servable model folder (default: a tiny Prithvi segmentation model)")
    parser.add_argument("--levels", default="1,4,16,64", help="comma-separated concurrency levels (empty: none)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most")
    parser.add_argument("--scene-size", type=int, default=128, help="scene height = width (pixels)")
    parser.add_argument("--scenes", type=int, default=8, help="distinct scenes sent round-robin")
    parser.add_argument("--mix", action="store_true", help="also run the realistic mix (sizes, url/b64)")
    parser.add_argument("--mix-sizes", default="256x256,512x384,768x1024,1024x1024,1536x2048,2048x2048",
                        help="the mix's scenes, HxW each")
    parser.add_argument("--mix-levels", default="2,8", help="concurrency levels of the mix")
    parser.add_argument("--mix-requests", type=int, default=24, help="requests per mix level")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/.models/online"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("serve_args", nargs="*", help="extra `vllm serve` arguments (after --)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from online_mix import Mix
    from vllm_terratorch.testing.launcher import DOCUMENTED, Server
    from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or work / "model"
    if args.model is None and not (model / "config.json").is_file():
        write_model_folder(model, sample_pretrained_cfg("segmentation"))
    scenes = [write_sample_geotiff(work / f"scene{i}.tif", args.scene_size, args.scene_size, seed=i) for i in range(args.scenes)]
    payloads = [Payload.of(str(model), b64_request(p)) for p in scenes]
    mix = Mix.prepare(work / "mix", args.mix_sizes, str(model)) if args.mix else None
    results: dict[str, Any] = {
        "title": f"online /pooling, {args.scene_size}px scenes",
        "model": str(model), "scene_size": args.scene_size, "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "plot_metric": "requests_per_s", "paths": {}, "levels": [], "in_tree": IN_TREE_NOTE,
    }
    serve_args = [*DOCUMENTED, *(mix.serve_args() if mix else []), *args.serve_args]
    with Server(model, serve_args, work / "server.log", meter_environment(work / "meter")) as server:
        assert urlsplit(server.url).hostname == "127.0.0.1"  # loopback only
        server.wait_ready()
        meters = ServerMeters(server.process.pid, work / "meter")
        send_all(server.url, payloads, 1, 2, 60)  # warm-up
        results["health_probe_idle"] = probe_for(server.url, 2.0)
        for level in tqdm(levels_of(args.levels), desc="concurrency levels"):
            results["levels"].append(measured_level(server, meters, payloads, level, args.requests, args.time_limit))
        if mix is not None:
            with mix.serving():
                send_all(server.url, mix.payloads[:2], 1, 2, 120)  # warm-up: a URL and a b64 request
                results["mix"] = mix.describe_run([
                    measured_level(server, meters, mix.payloads, level, args.mix_requests, args.time_limit, mix.describe)
                    for level in tqdm(levels_of(args.mix_levels), desc="mix levels")
                ])
    for entry in results["levels"]:
        results["paths"][f"c={entry['concurrency']}"] = {"requests_per_s": summary([entry["requests_per_s"]])}
        print_level(f"{args.scene_size}px", entry)
    for entry in (results.get("mix") or {}).get("levels", []):
        results["paths"][f"mix c={entry['concurrency']}"] = {"requests_per_s": summary([entry["requests_per_s"]])}
        print_level("mix", entry)
        print(f"    where time goes (share of request time): {entry['time_shares']}")
    idle = (results["health_probe_idle"].get("latency_s") or {})
    print(f"idle /health p50 {idle.get('p50', 0) * 1e3:.1f} ms max {idle.get('max', 0) * 1e3:.1f} ms")
    json_path, png_path = write_results(results, args.output, f"online-{args.scene_size}px")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
