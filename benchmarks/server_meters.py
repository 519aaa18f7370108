"""What `online.py` measures on the server's side of a load level, besides the responses themselves.

- The engine's busy fraction: forward seconds over wall seconds, from the engine meter
  (engine_meter/sitecustomize.py) that a server started with `meter_environment` writes.
- CPU seconds of each server process (API server, engine core, others) and of this client, from
  psutil: on a machine with few cores they share the cores, so where CPU goes is where time goes.
- Event-loop responsiveness: `HealthProbe` times GET /health every 50 ms. The API server answers it
  on the event loop that also accepts and answers `/pooling`; a decode, tiling or encode that held
  that loop (or the GIL of its process) shows as a slow probe. The probe runs in its own process so
  that this client's threads (JSON, base64) cannot delay it.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from common import summary

METER_ENV = "VLLM_TERRATORCH_BENCH_METER_DIR"
METER_PATH = Path(__file__).resolve().parent / "engine_meter"
# The meter writes at most every 0.2 s: wait a little longer before a snapshot so it holds every forward.
METER_SETTLE_S = 0.3
MACHINE, OTHERS = "machine", "rest_of_machine"


def meter_environment(meter_dir: Path) -> dict[str, str]:
    """Environment for the server: the engine meter on PYTHONPATH, writing into `meter_dir`."""
    meter_dir.mkdir(parents=True, exist_ok=True)
    for stale in meter_dir.glob("*.json"):
        stale.unlink()
    path = os.pathsep.join(p for p in (str(METER_PATH), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, METER_ENV: str(meter_dir)}


# vLLM's process titles (setproctitle) -> our names; the rest (multiprocessing's helpers) is "other".
ROLES = {"VLLM::EngineCore": "engine_core", "VLLM::Worker": "worker"}


def process_role(process: psutil.Process, server_pid: int) -> str:
    """api_server (the `vllm serve` process), engine_core (scheduler), worker (the model), or other."""
    if process.pid == server_pid:
        return "api_server"
    try:
        title = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "other"
    return next((role for marker, role in ROLES.items() if marker in title), "other")


@dataclass(frozen=True)
class Snapshot:
    wall: float
    cpu_s: dict[str, float]  # by role, the client included
    meter: dict[int, dict[str, Any]]  # by pid, what the engine meter last wrote
    roles: dict[int, str] = field(default_factory=dict)


class ServerMeters:
    """Snapshots of the server's processes before and after a level, and their difference."""

    def __init__(self, server_pid: int, meter_dir: Path) -> None:
        self.server_pid = server_pid
        self.meter_dir = meter_dir

    def snapshot(self) -> Snapshot:
        time.sleep(METER_SETTLE_S)
        root = psutil.Process(self.server_pid)
        cpu: dict[str, float] = {}
        roles: dict[int, str] = {}
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            role = roles[process.pid] = process_role(process, self.server_pid)
            cpu[role] = cpu.get(role, 0.0) + times.user + times.system
        own = psutil.Process().cpu_times()
        cpu["client"] = own.user + own.system + own.children_user + own.children_system
        machine = psutil.cpu_times()
        cpu[MACHINE] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        meter = {}
        for path in self.meter_dir.glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # replaced atomically; a half-written file is not expected, skip it if seen
            meter[int(record["pid"])] = record
        return Snapshot(time.perf_counter(), cpu, meter, roles)

    @staticmethod
    def difference(before: Snapshot, after: Snapshot, wall_s: float) -> dict[str, Any]:
        """The level's engine busy fraction, tiles per forward and CPU seconds per role.

        `wall_s` is the level's own wall time (first request sent to last answer); the snapshots
        bracket it, and no forward runs outside it, so busy seconds over it is the busy fraction.
        With several engine processes (data parallel) the fraction is their mean."""
        engines = []
        for pid, record in after.meter.items():
            old = before.meter.get(pid, {"busy_s": 0.0, "forwards": 0, "tiles": 0})
            if record.get("error"):
                return {"error": record["error"]}
            forwards = record["forwards"] - old["forwards"]
            engines.append({
                "pid": pid, "role": after.roles.get(pid, "unknown"), "busy_s": record["busy_s"] - old["busy_s"],
                "forwards": forwards, "tiles": record["tiles"] - old["tiles"], "max_tiles_ever": record["max_tiles"],
            })
        if not engines:
            return {"error": "the engine meter wrote nothing: was the server started with meter_environment?"}
        forwards = sum(e["forwards"] for e in engines)
        busy = sum(e["busy_s"] for e in engines) / len(engines)
        cpu = {role: round(after.cpu_s[role] - before.cpu_s.get(role, 0.0), 3) for role in after.cpu_s}
        # What the rest of the machine used meanwhile (other jobs): where it is large, the cores
        # were shared and the level's numbers are not this server's alone.
        cpu[OTHERS] = round(max(0.0, cpu.pop(MACHINE) - sum(cpu.values())), 3)
        return {
            "engine_busy_fraction": min(1.0, busy / wall_s),
            "engine_busy_s": busy,
            "forwards": forwards,
            "tiles_per_forward": sum(e["tiles"] for e in engines) / forwards if forwards else 0.0,
            "engines": engines,
            "cpu_s": cpu,
            # Cores kept busy, by role: CPU seconds over wall seconds.
            "cores_used": {role: round(seconds / wall_s, 3) for role, seconds in cpu.items()},
        }


def probe_loop(url: str, interval_s: float, stop: Any, results: Any) -> None:
    """GET /health every `interval_s` on one kept-alive connection until `stop` is set; put the
    samples (time.monotonic() sent, latency s, or None for a failure) on `results`."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    samples: list[tuple[float, float | None]] = []
    while not stop.is_set():
        sent, began = time.monotonic(), time.perf_counter()
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            samples.append((sent, time.perf_counter() - began if response.status == 200 else None))
        except (OSError, http.client.HTTPException):
            samples.append((sent, None))
            connection.close()
        stop.wait(max(0.0, interval_s - (time.perf_counter() - began)))
    connection.close()
    results.put(samples)


class HealthProbe:
    """`with HealthProbe(url) as probe:` ... `with probe.counting(): load()` ... then `probe.result`:
    the /health latency of the probes sent while the load ran (all of them without `counting`).

    The probe process starts with the outer block, so that it is probing when the load begins
    (a process takes a moment to start); time.monotonic() is one clock for all processes here."""

    def __init__(self, url: str, interval_s: float = 0.05) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results = context.Queue()
        self._process = context.Process(target=probe_loop, args=(url, interval_s, self._stop, self._results), daemon=True)
        self.interval_s = interval_s
        self.window = (0.0, float("inf"))
        self.result: dict[str, Any] = {}

    def __enter__(self) -> HealthProbe:
        self._process.start()
        return self

    @contextmanager
    def counting(self) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.window = (began, time.monotonic())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        samples = self._results.get(timeout=60)
        self._process.join(timeout=10)
        start, stop = self.window
        counted = [latency for sent, latency in samples if start <= sent <= stop]
        latencies = [latency for latency in counted if latency is not None]
        self.result = {
            "endpoint": "/health", "interval_s": self.interval_s, "failures": len(counted) - len(latencies),
            "latency_s": summary(latencies) if latencies else None,
        }


def probe_for(url: str, seconds: float) -> dict[str, Any]:
    """The probe on an idle server: the floor the loaded levels are compared with."""
    with HealthProbe(url) as probe:
        time.sleep(seconds)
    return probe.result


def shares(totals: Mapping[str, float]) -> dict[str, float]:
    """Each part's share of the parts' sum."""
    whole = sum(totals.values())
    return {name: round(value / whole, 4) if whole else 0.0 for name, value in totals.items()}
