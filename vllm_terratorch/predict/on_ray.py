"""`vllm-terratorch predict --ray`: the predict pipeline on Ray Data.

    file list (dataset) -> decode + tile (Ray tasks) -> inference (actor pool, one vLLM engine per
    actor) -> stitch + write (Ray tasks) -> records streamed back to the driver

- Decode tasks run the IO processor's `prepare` at float64 (the engine's dtype is only known
  inside the actors); each actor casts the tiles to its engine's dtype, which gives the values
  `prepare` gives at that dtype, so outputs are identical to local mode.
- One actor per GPU of the cluster (`num_gpus=1` each), or `--replicas N` (CPU clusters: N
  engines). Each actor batch holds the tiles of several scenes in one engine call.
- `--ray-address`: join a running cluster (inputs and OUTDIR must then be on storage every node
  sees); without it a local cluster is started (and stopped) with `--workers` CPUs for the
  decode/write tasks plus one per replica.
- Engine-busy time is measured in the actors; the fraction reported is busy time / (replicas x
  wall time from the first engine call to the last write).
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

from vllm_terratorch import envs
from vllm_terratorch.errors import UsageError
from vllm_terratorch.io.tiling import plan_tiles, tiling_from_config
from vllm_terratorch.predict.args import PROG
from vllm_terratorch.predict.engine import (
    SceneEncoder,
    create_engine,
    default_max_num_seqs,
    engine_encode,
    engine_kwargs,
    shutdown_engine,
)
from vllm_terratorch.predict.inputs import Item
from vllm_terratorch.predict.report import PipelineStats, Progress, finish
from vllm_terratorch.predict.tasks import ProcessorSpec, decode_scene, outputs_to_wire, write_prediction

# Environment passed to every Ray worker (engine settings, Hub access, our IO settings).
ENV_PREFIXES = ("VLLM_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "OMP_")
# Memory (bytes) reserved per decode / write task: a scene, its tiles and its outputs.
TASK_MEMORY = 256 * 1024 * 1024


def _decode_row(row: dict[str, Any], spec: ProcessorSpec) -> dict[str, Any]:
    decoded = decode_scene(spec, int(row["index"]), str(row["path"]))
    return {"index": int(row["index"]), "target": str(row["target"]), "payload": pickle.dumps(decoded, protocol=5)}


def _write_row(row: dict[str, Any], spec: ProcessorSpec) -> dict[str, Any]:
    inferred = pickle.loads(row["payload"])
    result = {"index": int(row["index"]), "ok": False, "error": None, "started": None, "finished": None,
              "tiles": -1, "engine_s": float(row["engine_s"]), "engine_start": float(row["engine_start"])}
    if not inferred["ok"]:
        result |= {"error": inferred["error"], "started": inferred.get("started")}
        return result
    written = write_prediction(spec, int(row["index"]), inferred["outputs"], inferred["pending"], str(row["target"]),
                               inferred["started"])
    return result | written | {"tiles": len(inferred["outputs"][1])}


class EngineActor:
    """One vLLM engine; each call encodes the tiles of a batch of decoded scenes together (the same
    `SceneEncoder` as local mode: bad scenes isolated, an engine death reported for every scene)."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.llm = create_engine(kwargs)
        self.encoder = SceneEncoder(engine_encode(self.llm), self.llm.llm_engine.vllm_config.model_config.dtype)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        decoded = [pickle.loads(payload) for payload in batch["payload"]]
        good = [d for d in decoded if d["ok"]]
        busy, started = self.encoder.busy_s, time.time()
        results: dict[int, dict[str, Any]] = {}
        for d, result in zip(good, self.encoder.run(good), strict=True):
            if result.ok:
                results[d["index"]] = {"ok": True, "outputs": outputs_to_wire(result.outputs), "pending": d["pending"],
                                       "started": d["started"]}
            else:
                results[d["index"]] = {"ok": False, "error": result.error, "started": d["started"]}
        busy = self.encoder.busy_s - busy
        payloads, engine_s = [], []
        for position, d in enumerate(decoded):
            payloads.append(pickle.dumps(results.get(d["index"], d), protocol=5))
            engine_s.append(busy if position == 0 else 0.0)
        return {
            "index": batch["index"],
            "target": batch["target"],
            "payload": payloads,
            "engine_s": engine_s,
            "engine_start": [started] * len(decoded),
        }

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown_engine(llm)


def _scenes_per_batch(todo: list[Item], chunk_tiles: int, model_dir: Path) -> int:
    """Scenes per actor call so that a call holds about `chunk_tiles` tiles (from input headers)."""
    import rasterio

    from vllm_terratorch.core.config import load_config

    cfg = load_config(model_dir).pretrained_cfg
    shape = cfg.input.data[cfg.input.image_inputs[0]].shape
    tiling = tiling_from_config(cfg.model.init_args.get("tiled_inference_parameters"), (shape[-2], shape[-1]))
    counts = []
    for item in todo[:32]:
        try:
            with rasterio.open(item.source) as source:
                counts.append(len(plan_tiles(source.height, source.width, tiling).origins))
        except Exception:  # noqa: BLE001 - bad inputs are reported by the decode task
            continue
    average = sum(counts) / len(counts) if counts else 1.0
    return max(1, min(len(todo), int(chunk_tiles // max(average, 1.0))))


def run_ray(args: argparse.Namespace, todo: list[Item], *, model_dir: Path, plugin: str,
            engine_options: dict[str, Any], meta: dict[str, Any]) -> PipelineStats:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'ray[data]'") from None

    env_vars = {name: value for name, value in os.environ.items() if name.startswith(ENV_PREFIXES)}
    envs.engine_environment(env_vars)
    env_vars.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    started_cluster = False
    if not ray.is_initialized():
        init: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "include_dashboard": False,
                                "logging_level": "WARNING"}
        if args.ray_address:
            ray.init(address=args.ray_address, **init)
        else:
            replicas = args.replicas or 1
            ray.init(num_cpus=args.workers + replicas, **init)
        started_cluster = True
    stats = PipelineStats()
    progress: Progress | None = None
    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.enable_operator_progress_bars = False
        context.print_on_execution_start = False
        gpus = int(ray.cluster_resources().get("GPU", 0))
        replicas = args.replicas or max(1, gpus)
        kwargs = engine_kwargs(args, model_dir, engine_options)
        chunk_tiles = args.chunk_tiles or 2 * (args.max_num_seqs or default_max_num_seqs())
        scenes_per_batch = _scenes_per_batch(todo, chunk_tiles, model_dir)
        spec = ProcessorSpec(str(model_dir), plugin, "float64", args.indices)
        meta |= {"replicas": replicas, "gpus_per_replica": 1 if gpus else 0, "scenes_per_batch": scenes_per_batch,
                 "ray_address": args.ray_address or "local", "engine_options": {k: v for k, v in kwargs.items() if k != "model"}}
        print(f"{PROG}: Ray: {replicas} engine actor(s) ({'1 GPU each' if gpus else 'CPU'}), "
              f"{scenes_per_batch} scenes per engine call, {len(todo)} inputs", file=sys.stderr, flush=True)
        rows = [{"index": item.index, "path": str(item.source), "target": str(item.output)} for item in todo]
        by_index = {item.index: item for item in todo}
        dataset = (
            # Blocks of a quarter engine batch: few enough tasks that Ray's per-task cost stays
            # small, enough that decoding runs in parallel and ahead of the actors.
            ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / max(1, scenes_per_batch // 4))))
            # Decoding stays a task stage: Ray Data fuses a task stage into the following actor
            # stage when their resource requests match, and the tasks' memory request differs.
            .map(_decode_row, fn_kwargs={"spec": spec}, memory=TASK_MEMORY)
            .map_batches(
                EngineActor,
                fn_constructor_kwargs={"kwargs": kwargs},
                batch_size=scenes_per_batch,
                concurrency=replicas,
                num_gpus=1 if gpus else 0,
                num_cpus=1,
                batch_format="numpy",
                zero_copy_batch=True,
            )
            .map(_write_row, fn_kwargs={"spec": spec}, memory=TASK_MEMORY)
        )
        progress = Progress(len(todo), not args.no_progress)
        first_engine, last_write = None, None
        start = time.monotonic()
        try:
            for row in dataset.iter_rows():
                progress.start()
                item = by_index[int(row["index"])]
                stats.engine_busy_s += float(row["engine_s"])
                stats.engine_calls += int(row["engine_s"] > 0)
                first_engine = min(first_engine or row["engine_start"], row["engine_start"])
                if row["finished"]:
                    last_write = max(last_write or row["finished"], row["finished"])
                if row["ok"]:
                    stats.tiles += int(row["tiles"])
                    item.record["tiles"] = int(row["tiles"])
                    progress.tiles_planned(int(row["tiles"]))  # Ray reports a scene once, when written
                    progress.tiles_done(int(row["tiles"]))
                finish(item, progress, bool(row["ok"]), row["error"], row["started"], row["finished"])
        except KeyboardInterrupt:
            stats.interrupted = True
            progress.message(f"{PROG}: interrupted; stopping Ray (outputs are written whole or not at all)")
        stats.wall_s = time.monotonic() - start
        if first_engine and last_write and last_write > first_engine:
            engine_wall = last_write - first_engine
            stats.busy_fraction = stats.engine_busy_s / (replicas * engine_wall)
            meta |= {"engine_wall_seconds": round(engine_wall, 3)}
        return stats
    finally:
        if progress is not None:
            progress.close()
        if started_cluster:
            ray.shutdown()

