"""CI smoke run of both benchmark scripts on the tiny model: the JSON schema, and that ours, the
raw PyTorch forward and the in-tree vLLM model produce the same outputs. No timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import vllm
from packaging.version import Version

pytestmark = pytest.mark.integration
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# vLLM 0.26's in-tree Terratorch model does not start (StopIteration in its profiling run, see
# STACK.md): there the benchmark must report that path's error instead of numbers.
INTREE_STARTS = Version(vllm.__version__).release >= (0, 27)


def run(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_offline_smoke(tmp_path):
    run("offline.py", "--model", "tiny", "--num-images", "12", "--batch-size", "4", "--repeats", "2", "--rounds", "2",
        "--paths", "raw,raw-bound,ours,intree", "--work-dir", str(tmp_path / "models"), "--output", str(tmp_path))
    results = json.loads((tmp_path / "offline-tiny-64-float32-b4.json").read_text())
    assert (tmp_path / "offline-tiny-64-float32-b4.png").stat().st_size > 0
    assert set(results["paths"]) == {"raw", "raw-bound", "ours", "intree"}
    # raw-bound: the plain forward in a child process with the engine worker's environment. Our CPU
    # default runs the worker inside the engine-core process, unbound, every core: vLLM's LD_PRELOAD
    # (libgomp) and no OpenMP binding or thread count of vLLM's.
    environment = results["paths"]["raw-bound"]["worker_environment"]
    assert "libgomp" in environment["LD_PRELOAD"]
    assert not {"OMP_NUM_THREADS", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"} & set(environment)
    assert set(results["ratios_vs_raw_bound"]) == {"ours"} | ({"intree"} if INTREE_STARTS else set())
    running = ("raw", "raw-bound", "ours", "intree") if INTREE_STARTS else ("raw", "raw-bound", "ours")
    for name in running:
        entry = results["paths"][name]
        assert "error" not in entry, entry
        # Two rounds (A B C D, then D C B A) of two timed calls each, pooled; each round's median kept.
        assert entry["images_per_s"]["n"] == len(entry["seconds_samples"]) == 4 and entry["images_per_s"]["median"] > 0
        assert len(entry["rounds_images_per_s_median"]) == 2
    assert results["paths"]["ours"]["max_abs_diff_vs_raw"] <= 1e-4
    if INTREE_STARTS:
        # The in-tree model computes at TerraTorch's "medium" float32 precision (set by its import
        # in the engine process): as close to raw as that precision allows on this machine.
        reduced = results["raw_at_intree_precision_max_abs_diff_vs_raw"]
        assert results["paths"]["intree"]["max_abs_diff_vs_raw"] <= 1e-4 + 4 * reduced
    assert set(results["ratios_vs_raw"]) == set(running[1:])
    if not INTREE_STARTS:
        assert "error" in results["paths"]["intree"]


def test_online_smoke(tmp_path):
    """The levels and a tiny mix (two shapes, each sent as a URL and as base64) on one server: the
    client's numbers, the server-side meters (engine busy fraction, CPU by process, /health probe)
    and the mix's split of each request's time. Schema only, no timing asserts."""
    run("online.py", "--levels", "1,2", "--requests", "4", "--scene-size", "80", "--scenes", "2",
        "--mix", "--mix-sizes", "96x80,64x128", "--mix-levels", "2", "--mix-requests", "4",
        "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path))
    results = json.loads((tmp_path / "online-80px.json").read_text())
    assert [level["concurrency"] for level in results["levels"]] == [1, 2]
    for level in results["levels"]:
        assert level["requests"] == 4 and level["requests_per_s"] > 0
        assert set(level["server_split_s"]) == {"decode_s", "engine_s", "encode_s"}
        assert_level_schema(level)
    assert results["health_probe_idle"]["latency_s"]["n"] > 0
    mix = results["mix"]
    assert mix["shapes"] == ["96x80", "64x128"] and mix["formats"] == ["url", "b64"]
    (level,) = mix["levels"]
    assert level["concurrency"] == 2 and level["requests"] == 4
    assert_level_schema(level)
    rows = level["per_request"]
    assert sorted((row["shape"], row["format"]) for row in rows) == sorted(
        (shape, form) for shape in ("96x80", "64x128") for form in ("url", "b64"))
    parts = ("decode_s", "queue_engine_s", "encode_s", "outside_s")
    assert all(row[part] >= 0 for row in rows for part in parts)
    assert set(level["time_shares"]) == set(parts) and sum(level["time_shares"].values()) == pytest.approx(1, abs=1e-3)
    assert set(level["by_shape"]) == {"96x80", "64x128"} and set(level["by_format"]) == {"url", "b64"}


def assert_level_schema(level):
    """No errors; the latency percentiles; the engine meter's busy fraction and tiles per forward;
    CPU seconds of the API server and the model's process; the /health probe's latencies."""
    assert level["errors"] == 0
    assert {"p50", "p95", "p99"} <= set(level["latency_s"])
    server = level["server"]
    assert "error" not in server, server
    assert 0 <= server["engine_busy_fraction"] <= 1 and server["forwards"] >= 1 and server["tiles_per_forward"] >= 1
    assert {"api_server", "client"} <= set(server["cpu_s"]) and {"engine_core", "worker"} & set(server["cpu_s"])
    assert all(seconds >= 0 for seconds in server["cpu_s"].values())
    probe = level["health_probe"]
    assert probe["endpoint"] == "/health" and probe["failures"] == 0
    assert probe["latency_s"]["n"] >= 1 and {"p50", "p95", "max"} <= set(probe["latency_s"])


def test_online_burst_smoke(tmp_path):
    """A large scene with small requests beside it, on a paced and an unpaced server: both answer
    everything (schema only, no timing asserts)."""
    run("online_burst.py", "--big", "256", "--small-requests", "3", "--repeats", "1",
        "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path))
    results = json.loads((tmp_path / "online-burst.json").read_text())
    assert set(results["settings"]) == set(results["paths"]) == {"paced", "unpaced"}
    assert results["settings"]["unpaced"]["VLLM_TERRATORCH_SUBMISSIONS_PER_TURN"] == "0"
    for setting in results["settings"].values():
        (burst,) = setting["bursts"]
        assert burst["big_ok"] and burst["small"] == {**burst["small"], "requests": 3, "errors": 0}
        assert burst["health"]["failures"] == 0 and burst["health"]["latency_s"]["n"] >= 1


def test_scenes_smoke(tmp_path):
    """benchmarks/scenes.py (#18): one small scene streamed and held whole, the same classes."""
    run("scenes.py", "--sizes", "1100", "--whole-up-to", "1100", "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path))
    results = json.loads((tmp_path / "scenes-tile512-float32.json").read_text())
    streamed, whole = results["runs"]
    assert (streamed["streamed"], whole["streamed"]) == (True, False)
    for entry in (streamed, whole):
        assert entry["returncode"] == 0 and entry["tiles"] == 9 and entry["peak_rss_bytes"] > 0 and entry["s_per_megapixel"] > 0
    assert streamed["agreement_with_whole"] >= 0.999
    assert (tmp_path / "scenes-tile512-float32.png").stat().st_size > 0


def test_offline_adapter_and_compiled_paths(tmp_path):
    """The paths that need no vLLM engine (what runs on the GPU image), a compile mode named per
    path, and the profile of the raw forward."""
    run("offline.py", "--model", "tiny", "--num-images", "8", "--batch-size", "4", "--repeats", "1",
        "--paths", "raw,adapter,adapter-compiled=default", "--profile",
        "--work-dir", str(tmp_path / "models"), "--output", str(tmp_path))
    results = json.loads((tmp_path / "offline-tiny-64-float32-b4.json").read_text())
    assert set(results["paths"]) == {"raw", "adapter", "adapter-compiled=default"}
    for name, entry in results["paths"].items():
        assert "error" not in entry, (name, entry)
        assert entry["first_pass_s"] > 0 and entry["images_per_s"]["n"] == 1
    assert results["paths"]["adapter-compiled=default"]["compile_mode"] == "default"
    assert results["paths"]["adapter"]["max_abs_diff_vs_raw"] == 0.0
    assert results["paths"]["adapter-compiled=default"]["max_abs_diff_vs_raw"] <= 1e-4
    rows = results["profile_raw"]
    assert rows and all({"name", "calls", "ms", "share"} <= set(row) for row in rows)
    # Largest first, each share its own time over the total, and a forward's real operators in it.
    assert [row["ms"] for row in rows] == sorted((row["ms"] for row in rows), reverse=True)
    assert all(row["calls"] >= 1 and 0 < row["share"] <= 1 for row in rows)
    assert rows[0]["share"] == pytest.approx(rows[0]["ms"] / (rows[-1]["ms"] / rows[-1]["share"]), rel=1e-6)
    assert any("conv" in row["name"] or "linear" in row["name"] or "addmm" in row["name"] for row in rows)


def test_offline_rejects_unknown_path(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "offline.py"), "--paths", "raw,fast", "--work-dir", str(tmp_path), "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "unknown path(s) ['fast']" in result.stderr
