"""`predict` on one machine: a process pool decodes and tiles scenes ahead of the engine, the engine
encodes tiles of many scenes per call (`--chunk-tiles`), and the pool stitches and writes behind it."""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from vllm_terratorch.predict.args import PROG
from vllm_terratorch.core.dtypes import dtype_name
from vllm_terratorch.predict.engine import SceneEncoder, create_engine, engine_encode, engine_kwargs, shutdown_engine
from vllm_terratorch.predict.inputs import Item
from vllm_terratorch.predict.report import PipelineStats, Progress, finish
from vllm_terratorch.registration import pipeline_class
from vllm_terratorch.predict.tasks import (
    ProcessorSpec,
    decode_scene,
    outputs_to_wire,
    warm_up,
    worker_init,
    write_prediction,
)


class LocalPipeline:
    """Decode ahead in a process pool, encode chunks of tiles from many scenes, write behind.

    `encoder` makes the engine calls (the loop Ray mode uses too).
    """

    def __init__(
        self,
        spec: ProcessorSpec,
        pool: Any,
        encoder: SceneEncoder,
        *,
        chunk_tiles: int,
        workers: int,
        progress: Progress,
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.encoder = encoder
        self.chunk_tiles = chunk_tiles
        self.workers = workers
        self.progress = progress
        self.stats = PipelineStats()

    def _finish(self, item: Item, ok: bool, error: str | None = None, started: float | None = None,
                finished: float | None = None, tiles: int | None = None) -> None:
        finish(item, self.progress, ok, error, started, finished, tiles)

    def _run_engine(self, chunk: list[tuple[Item, dict[str, Any]]]) -> list[tuple[Item, dict[str, Any], list[Any]]]:
        done = []
        for (item, decoded), result in zip(chunk, self.encoder.run([decoded for _, decoded in chunk]), strict=True):
            if result.ok:
                done.append((item, decoded, result.outputs))
            else:
                self._finish(item, False, result.error, decoded["started"])
        self.stats.engine_busy_s, self.stats.engine_calls = self.encoder.busy_s, self.encoder.calls
        self.stats.tiles = self.encoder.tiles
        return done

    # main loop -----------------------------------------------------------------------------

    def run(self, items: list[Item], preloaded: Sequence[tuple[Item, dict[str, Any]]] = ()) -> PipelineStats:
        todo = deque(items)
        decoding: dict[Any, Item] = {}
        writing: dict[Any, tuple[Item, int]] = {}
        ready: deque[tuple[Item, dict[str, Any]]] = deque(preloaded)
        ready_tiles = sum(decoded["count"] for _, decoded in preloaded)
        decoded_scenes, decoded_tiles = len(preloaded), ready_tiles
        ahead_tiles = 2 * self.chunk_tiles
        start = time.monotonic()

        def submit_decodes() -> None:
            average = decoded_tiles / decoded_scenes if decoded_scenes else 1.0
            while todo and not self.encoder.fatal and ready_tiles + len(decoding) * average < ahead_tiles and len(decoding) < 4096:
                item = todo.popleft()
                decoding[self.pool.submit(decode_scene, self.spec, item.index, str(item.source))] = item

        def harvest_decodes(futures: Sequence[Any]) -> None:
            nonlocal ready_tiles, decoded_scenes, decoded_tiles
            for future in futures:
                item = decoding.pop(future)
                try:
                    decoded = future.result()
                except Exception as error:  # noqa: BLE001 - a worker died (e.g. out of memory)
                    decoded = {"ok": False, "error": f"worker failed: {error!r}", "started": None}
                if decoded["ok"]:
                    tiles = decoded["count"]
                    item.record["tiles"] = tiles
                    ready.append((item, decoded))
                    ready_tiles += tiles
                    decoded_scenes += 1
                    decoded_tiles += tiles
                else:
                    self._finish(item, False, decoded["error"], decoded["started"])

        def harvest_writes(futures: Sequence[Any]) -> None:
            for future in futures:
                item, tiles = writing.pop(future)
                try:
                    result = future.result()
                except Exception as error:  # noqa: BLE001
                    result = {"ok": False, "error": f"worker failed: {error!r}", "started": None, "finished": None}
                self._finish(item, result["ok"], result.get("error"), result["started"], result["finished"], tiles)

        try:
            while True:
                submit_decodes()
                harvest_decodes([f for f in list(decoding) if f.done()])
                if not ready:
                    if decoding:
                        done, _ = wait(list(decoding), return_when=FIRST_COMPLETED)
                        harvest_decodes(list(done))
                        continue
                    if todo and not self.encoder.fatal:
                        continue
                    break
                chunk: list[tuple[Item, dict[str, Any]]] = []
                chunk_tiles = 0
                while ready and chunk_tiles < self.chunk_tiles:
                    item, decoded = ready.popleft()
                    chunk.append((item, decoded))
                    chunk_tiles += decoded["count"]
                ready_tiles -= chunk_tiles
                submit_decodes()  # keep the pool busy while the engine runs
                for item, decoded, outputs in self._run_engine(chunk):
                    future = self.pool.submit(
                        write_prediction, self.spec, item.index, outputs_to_wire(outputs), decoded["pending"],
                        str(item.output), decoded["started"],
                    )
                    writing[future] = (item, len(outputs))
                harvest_writes([f for f in list(writing) if f.done()])
                # Bounded memory: at most two chunks of outputs wait for the pool (the engine only
                # waits here when writing falls behind inference for good).
                while sum(tiles for _, tiles in writing.values()) > 2 * self.chunk_tiles:
                    done, _ = wait(list(writing), return_when=FIRST_COMPLETED)
                    harvest_writes(list(done))
                if self.encoder.fatal:
                    while ready:
                        item, decoded = ready.popleft()
                        self._finish(item, False, f"inference failed: {self.encoder.fatal}", decoded["started"])
            if writing:
                done, _ = wait(list(writing))
                harvest_writes(list(done))
        except KeyboardInterrupt:
            self.stats.interrupted = True
            for future in decoding:
                future.cancel()
            if writing:
                self.progress.message(
                    f"{PROG}: interrupted; finishing the {len(writing)} outputs already inferred (Ctrl-C again to stop now)"
                )
                try:
                    done, _ = wait(list(writing))
                    harvest_writes(list(done))
                except KeyboardInterrupt:
                    pass
        finally:
            self.stats.wall_s = time.monotonic() - start
        return self.stats


def run_local(args: argparse.Namespace, todo: list[Item], *, model_dir: Path, plugin: str,
               engine_options: dict[str, Any], meta: dict[str, Any], llm: Any = None) -> PipelineStats:
    # Scenes are prepared at float64 and cast to the engine's dtype just before inference (one
    # rounding, as `prepare` at that dtype does), so decoding needs no engine and starts at once.
    spec = ProcessorSpec(str(model_dir), plugin, "float64", args.indices)
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init)
    owned = llm is None
    stats = PipelineStats()
    progress = Progress(len(todo), not args.no_progress)
    try:
        # Workers start (and import) while the engine loads.
        warmups = [pool.submit(warm_up, spec) for _ in range(args.workers)]
        # The engine starts only once a scene is ready for it: a re-run whose remaining inputs are
        # all bad reports them without loading the model.
        remaining = deque(todo)
        preloaded: list[tuple[Item, dict[str, Any]]] = []
        while remaining and not preloaded:
            item = remaining.popleft()
            decoded = decode_scene(spec, item.index, str(item.source))
            if decoded["ok"]:
                item.record["tiles"] = decoded["count"]
                preloaded.append((item, decoded))
            else:
                finish(item, progress, False, decoded["error"], decoded["started"])
        if not preloaded:
            return stats
        if owned:
            kwargs = engine_kwargs(args, model_dir, engine_options)
            progress.message(f"{PROG}: starting the engine: LLM({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
            llm = create_engine(kwargs)
        vllm_config = llm.llm_engine.vllm_config
        dtype = vllm_config.model_config.dtype
        pipeline_class(plugin).for_model_folder(model_dir, dtype)  # fails here if the processor cannot serve the model
        max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        chunk_tiles = args.chunk_tiles or 2 * max_num_seqs
        meta |= {"dtype": dtype_name(dtype), "max_num_seqs": max_num_seqs, "chunk_tiles": chunk_tiles,
                 "workers": args.workers}
        if owned:
            meta["engine_options"] = {k: v for k, v in kwargs.items() if k != "model"}
        for future in warmups:
            future.result()

        progress.start()
        pipeline = LocalPipeline(spec, pool, SceneEncoder(engine_encode(llm), dtype), chunk_tiles=chunk_tiles,
                                 workers=args.workers, progress=progress)
        stats = pipeline.run(list(remaining), preloaded=preloaded)
        return stats
    except KeyboardInterrupt:
        stats.interrupted = True
        return stats
    finally:
        progress.close()
        pool.shutdown(wait=True, cancel_futures=True)
        if owned and llm is not None:
            shutdown_engine(llm)
