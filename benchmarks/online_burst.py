"""Does one large scene deafen the server? /health and small requests while a big scene goes in.

Each tile of a `/pooling` request is its own engine request, and vLLM starts all of a request's
`add_request` calls in one event-loop iteration; our IO processors pace them
(engine/pacing.py, `VLLM_TERRATORCH_SUBMISSIONS_PER_TURN`). This starts the server of the mission's
command line twice on the same tiny model, paced (the default) and unpaced (0: vLLM's own
behaviour), and in each, `--repeats` times: one `--big`² scene (1849 tiles of 64² at 2048²) while a
second client sends `--small-requests` 128² scenes one after another and a third process GETs
/health every 20 ms. Reports per setting the /health latency (max, p95), the big scene's latency
and the small requests' (p50, max). Writes `<output>/online-burst.json` and `.png` (/health max).

    python benchmarks/online_burst.py                      # 2048², 2 repeats, paced and unpaced
    python benchmarks/online_burst.py --big 1024 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_results  # noqa: E402
from online_load import Answer, Payload, b64_request, send_all  # noqa: E402
from server_meters import HealthProbe  # noqa: E402

SETTINGS = {"paced": None, "unpaced": "0"}  # VLLM_TERRATORCH_SUBMISSIONS_PER_TURN (None: the default)


def one_burst(url: str, big: Payload, small: Payload, small_requests: int) -> dict[str, Any]:
    """The big scene with small requests beside it, /health probed throughout."""
    beside: list[Answer] = []
    with HealthProbe(url, 0.02) as probe:
        time.sleep(1.0)  # the probe is running before the load starts
        with probe.counting():
            sender = threading.Thread(target=lambda: beside.extend(send_all(url, [small], 1, small_requests, 300)[0]))
            sender.start()
            (answer,), _ = send_all(url, [big], 1, 1, 600)
            sender.join()
    latencies = [a.latency_s for a in beside]
    return {"big_ok": answer.ok, "big_latency_s": answer.latency_s, "health": probe.result,
            "small": {"requests": len(beside), "errors": sum(not a.ok for a in beside),
                      "latency_s": summary(latencies) if latencies else None}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=2048, help="the large scene's side (pixels)")
    parser.add_argument("--small-requests", type=int, default=40, help="128² requests sent beside it, one at a time")
    parser.add_argument("--repeats", type=int, default=2, help="bursts per setting")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/.models/online-burst"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    from vllm_terratorch.testing.launcher import DOCUMENTED, Server
    from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        write_model_folder(model, sample_pretrained_cfg("segmentation"))
    big = Payload.of(str(model), b64_request(write_sample_geotiff(work / "big.tif", args.big, args.big, seed=1)))
    small = Payload.of(str(model), b64_request(write_sample_geotiff(work / "small.tif", 128, 128, seed=2)))
    results: dict[str, Any] = {"title": f"GET /health while a {args.big}² scene enters the engine", "model": str(model),
                               "big": args.big, "machine": machine(), "plot_metric": "health_max_ms", "paths": {}, "settings": {}}
    for name, per_turn in SETTINGS.items():
        environment = {"VLLM_TERRATORCH_SUBMISSIONS_PER_TURN": per_turn or ""}  # empty: the default
        with Server(model, DOCUMENTED, work / f"server-{name}.log", environment) as server:
            server.wait_ready()
            send_all(server.url, [small], 1, 2, 60)
            send_all(server.url, [big], 1, 1, 600)  # warm: the first large request allocates
            bursts = [one_burst(server.url, big, small, args.small_requests) for _ in range(args.repeats)]
        results["settings"][name] = {"VLLM_TERRATORCH_SUBMISSIONS_PER_TURN": per_turn or "default", "bursts": bursts}
        maxima = [b["health"]["latency_s"]["max"] * 1e3 for b in bursts if b["health"]["latency_s"]]
        results["paths"][name] = {"health_max_ms": summary(maxima)}
        for burst in bursts:
            health, beside = burst["health"]["latency_s"] or {}, burst["small"]["latency_s"] or {}
            print(f"{name:>8}: /health max {health.get('max', 0) * 1e3:6.0f} ms p95 {health.get('p95', 0) * 1e3:5.1f} ms  "
                  f"big scene {burst['big_latency_s']:6.2f} s  small p50 {beside.get('p50', 0):.3f} s max {beside.get('max', 0):.2f} s")
    json_path, png_path = write_results(results, args.output, "online-burst")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
