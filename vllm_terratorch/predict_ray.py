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

from vllm_terratorch.predict import (
    PROG,
    Item,
    PipelineStats,
    Progress,
    UsageError,
    create_engine,
    engine_kwargs,
    shutdown_engine,
)
from vllm_terratorch.predict_tasks import ProcessorSpec

# Environment passed to every Ray worker (engine settings, Hub access, our IO settings).
ENV_PREFIXES = ("VLLM_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "OMP_")
# Memory (bytes) reserved per decode / write task: a scene, its tiles and its outputs.
TASK_MEMORY = 256 * 1024 * 1024


def _decode_row(row: dict[str, Any], spec: ProcessorSpec) -> dict[str, Any]:
    from vllm_terratorch.predict_tasks import decode_scene

    decoded = decode_scene(spec, int(row["index"]), str(row["path"]))
    return {"index": int(row["index"]), "target": str(row["target"]), "payload": pickle.dumps(decoded, protocol=5)}


def _write_row(row: dict[str, Any], spec: ProcessorSpec) -> dict[str, Any]:
    from vllm_terratorch.predict_tasks import write_prediction

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
    """One vLLM engine; each call encodes the tiles of a batch of decoded scenes together."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.llm = create_engine(kwargs)
        self.dtype = self.llm.llm_engine.vllm_config.model_config.dtype

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from vllm_terratorch.predict_tasks import build_prompts, describe_error, outputs_to_wire

        decoded = [pickle.loads(payload) for payload in batch["payload"]]
        good = [d for d in decoded if d["ok"]]
        prompts_per_scene = [build_prompts(d, self.dtype) for d in good]
        prompts = [prompt for scene in prompts_per_scene for prompt in scene]
        busy, started = 0.0, time.time()
        results: dict[int, dict[str, Any]] = {}
        try:
            outputs = self._encode(prompts)
            busy = time.time() - started
            offset = 0
            for d, scene in zip(good, prompts_per_scene):
                results[d["index"]] = {"ok": True, "outputs": outputs_to_wire(outputs[offset : offset + len(scene)]),
                                       "pending": d["pending"], "started": d["started"]}
                offset += len(scene)
        except Exception as batch_error:  # noqa: BLE001 - isolate the bad scene(s)
            for d, scene in zip(good, prompts_per_scene):
                try:
                    results[d["index"]] = {"ok": True, "outputs": outputs_to_wire(self._encode(scene)),
                                           "pending": d["pending"], "started": d["started"]}
                except Exception as error:  # noqa: BLE001
                    results[d["index"]] = {"ok": False, "error": f"inference failed: {describe_error(error)}",
                                           "started": d["started"]}
            busy = time.time() - started
            del batch_error
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

    def _encode(self, prompts: list[dict[str, Any]]) -> list[Any]:
        if not prompts:
            return []
        outputs = [output.outputs.data for output in self.llm.encode(prompts, pooling_task="plugin", use_tqdm=False)]
        if len(outputs) != len(prompts):
            raise RuntimeError(f"the engine returned {len(outputs)} outputs for {len(prompts)} tiles")
        return outputs

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown_engine(llm)


def _scenes_per_batch(todo: list[Item], chunk_tiles: int, spec_tiles: tuple[int, int, int, int]) -> int:
    """Scenes per actor call so that a call holds about `chunk_tiles` tiles (from input headers)."""
    import rasterio

    h_crop, w_crop, h_stride, w_stride = spec_tiles
    counts = []
    for item in todo[:32]:
        try:
            with rasterio.open(item.source) as source:
                rows = max(1, math.ceil(max(source.height - h_crop, 0) / h_stride) + 1)
                cols = max(1, math.ceil(max(source.width - w_crop, 0) / w_stride) + 1)
                counts.append(rows * cols)
        except Exception:  # noqa: BLE001 - bad inputs are reported by the decode task
            continue
    average = sum(counts) / len(counts) if counts else 1.0
    return max(1, min(len(todo), int(chunk_tiles // max(average, 1.0))))


def _tiling(model_dir: Path) -> tuple[int, int, int, int]:
    from vllm_terratorch.config import load_config
    from vllm_terratorch.io.tiling import tiling_from_config

    cfg = load_config(model_dir).pretrained_cfg
    spec = cfg.input
    shape = spec.data[spec.image_input].shape
    tiling = tiling_from_config(cfg.model.init_args.get("tiled_inference_parameters"), (shape[-2], shape[-1]))
    return tiling.h_crop, tiling.w_crop, tiling.h_stride, tiling.w_stride


def run_ray(args: argparse.Namespace, todo: list[Item], *, model_dir: Path, plugin: str,
            engine_options: dict[str, Any], meta: dict[str, Any]) -> PipelineStats:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'ray[data]'") from None

    env_vars = {name: value for name, value in os.environ.items() if name.startswith(ENV_PREFIXES)}
    env_vars.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
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
        chunk_tiles = args.chunk_tiles or 2 * (args.max_num_seqs or 256)
        scenes_per_batch = _scenes_per_batch(todo, chunk_tiles, _tiling(model_dir))
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
                started = row["started"]
                item.record.update(
                    status="ok" if row["ok"] else "failed",
                    error=row["error"] or None,
                    seconds=round((row["finished"] or time.time()) - started, 4) if started else None,
                )
                if not row["ok"]:
                    progress.message(f"{PROG}: failed: {item.source}: {row['error']}")
                progress.done(bool(row["ok"]))
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

