"""`predict` on one machine: a process pool decodes and tiles scenes ahead of the engine, the engine
encodes tiles of many scenes per call (`--chunk-tiles`), and the pool stitches and writes behind it."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from vllm_terratorch import envs
from vllm_terratorch.predict.args import PROG
from vllm_terratorch.core.dtypes import dtype_name
from vllm_terratorch.predict.engine import SceneEncoder, create_engine, engine_encode, engine_kwargs, shutdown_engine
from vllm_terratorch.predict.inputs import Item
from vllm_terratorch.predict.report import PipelineStats, Progress, finish, peak_rss_bytes
from vllm_terratorch.predict.streams import Chunk, SceneStream
from vllm_terratorch.registration import pipeline_class
from vllm_terratorch.predict.tasks import (
    ProcessorSpec,
    decode_chunk,
    decode_scene,
    describe_error,
    outputs_to_wire,
    warm_up,
    worker_init,
    write_prediction,
)


MAX_OPEN_STREAMS = 2  # streamed scenes with a writer at once (one finishing, the next starting)
# Tile inputs per engine call at most (float32 bytes). Two calls' worth wait ahead of the engine and
# two calls' outputs behind it, and the forward's activations grow with the call, so this (not the
# scene size) bounds what a run holds. On a CPU 32 MiB is 128 tiles of 64^2 x 6 bands, 26 of 224^2,
# 5 of 512^2: measured on 2 cores, 4 tiles of 512^2 per call ran 25 % faster than 10, and 20
# cost 2 GB more. A GPU batches far more per call, in device memory: 1 GiB there.
CHUNK_BYTES = {"cpu": 32 * 1024**2, "gpu": 1024**3}


def default_chunk_tiles(pipeline: Any, max_num_seqs: int, device: str) -> int:
    """Tiles per engine call: two engine batches, fewer where the tiles are large (CHUNK_BYTES)."""
    data, tiling = pipeline.pretrained_cfg.input.data, pipeline.tiling
    tile_bytes = sum(4 * math.prod(data[name].shape[:-2]) * tiling.h_crop * tiling.w_crop for name in pipeline.image_names)
    budget = CHUNK_BYTES["cpu" if device == "cpu" else "gpu"]
    return max(1, min(2 * max_num_seqs, budget // tile_bytes))


class LocalPipeline:
    """Decode ahead in a process pool, encode chunks of tiles from many scenes, write behind.

    `encoder` makes the engine calls (the loop Ray mode uses too). A unit of the engine queue is a
    whole decoded scene (`Item`) or a run of a streamed scene's tiles (`Chunk`, streams.py).
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
        cog: bool = False,
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.encoder = encoder
        self.chunk_tiles = chunk_tiles
        self.workers = workers
        self.progress = progress
        self.cog = cog
        self.stats = PipelineStats()
        self.writer_thread = ThreadPoolExecutor(1, thread_name_prefix="predict-stream-writer")

    def _finish(self, item: Item, ok: bool, error: str | None = None, started: float | None = None,
                finished: float | None = None, tiles: int | None = None) -> None:
        finish(item, self.progress, ok, error, started, finished, tiles)

    def _run_engine(self, chunk: list[tuple[Item | Chunk, dict[str, Any]]]) -> list[tuple[Item | Chunk, dict[str, Any], list[Any]]]:
        done = []
        for (unit, decoded), result in zip(chunk, self.encoder.run([decoded for _, decoded in chunk]), strict=True):
            if result.ok:
                self.progress.tiles_done(decoded["count"])
                done.append((unit, decoded, result.outputs))
            elif isinstance(unit, Chunk):
                unit.stream.fail(result.error or "inference failed")
            else:
                self._finish(unit, False, result.error, decoded["started"])
        self.stats.engine_busy_s, self.stats.engine_calls = self.encoder.busy_s, self.encoder.calls
        self.stats.tiles = self.encoder.tiles
        return done

    # main loop -----------------------------------------------------------------------------

    def run(self, items: list[Item], preloaded: Sequence[tuple[Item, dict[str, Any]]] = ()) -> PipelineStats:
        todo = deque(items)
        decoding: dict[Any, Item | Chunk] = {}
        writing: dict[Any, tuple[Item, int]] = {}
        ready: deque[tuple[Item | Chunk, dict[str, Any]]] = deque()
        waiting: deque[tuple[Item, dict[str, Any]]] = deque()  # streamed scenes not opened yet
        streams: list[SceneStream] = []  # opened, not finished
        ready_tiles = decoded_scenes = decoded_tiles = 0
        ahead_tiles = 2 * self.chunk_tiles
        start = time.monotonic()

        def decoding_tiles() -> float:
            average = decoded_tiles / decoded_scenes if decoded_scenes else 1.0
            return sum(unit.stop - unit.start if isinstance(unit, Chunk) else average for unit in decoding.values())

        def accept(item: Item, decoded: dict[str, Any]) -> None:
            nonlocal ready_tiles, decoded_scenes, decoded_tiles
            tiles = decoded["count"]
            item.record["tiles"] = tiles
            self.progress.tiles_planned(tiles)
            decoded_scenes += 1
            decoded_tiles += tiles
            if decoded.get("stream"):
                waiting.append((item, decoded))
            else:
                ready.append((item, decoded))
                ready_tiles += tiles

        def next_stream_chunk() -> Chunk | None:
            for stream in streams:
                bounds = stream.next_chunk()
                if bounds is not None:
                    return Chunk(stream, *bounds)
            while waiting and len(streams) < MAX_OPEN_STREAMS:
                item, decoded = waiting.popleft()
                try:
                    stream = SceneStream(item, self.spec, self.chunk_tiles, self.writer_thread, cog=self.cog,
                                         started=decoded["started"])
                except Exception as error:  # noqa: BLE001 - the scene fails, the run goes on
                    self._finish(item, False, describe_error(error), decoded["started"])
                    continue
                streams.append(stream)
                bounds = stream.next_chunk()
                if bounds is not None:
                    return Chunk(stream, *bounds)
            return None

        def submit_decodes() -> None:
            while not self.encoder.fatal and ready_tiles + decoding_tiles() < ahead_tiles and len(decoding) < 4096:
                unit = next_stream_chunk()
                if unit is not None:
                    future = self.pool.submit(decode_chunk, self.spec, unit.stream.item.index, str(unit.stream.item.source),
                                              unit.start, unit.stop)
                    decoding[future] = unit
                elif todo:
                    item = todo.popleft()
                    decoding[self.pool.submit(decode_scene, self.spec, item.index, str(item.source))] = item
                else:
                    return

        def harvest_decodes(futures: Sequence[Any]) -> None:
            nonlocal ready_tiles
            for future in futures:
                unit = decoding.pop(future)
                try:
                    decoded = future.result()
                except Exception as error:  # noqa: BLE001 - a worker died (e.g. out of memory)
                    decoded = {"ok": False, "error": f"worker failed: {error!r}", "started": None}
                if isinstance(unit, Chunk):
                    if decoded["ok"]:
                        ready.append((unit, decoded))
                        ready_tiles += decoded["count"]
                    else:
                        unit.stream.fail(decoded["error"])
                elif decoded["ok"]:
                    accept(unit, decoded)
                else:
                    self._finish(unit, False, decoded["error"], decoded["started"])

        def harvest_writes(futures: Sequence[Any]) -> None:
            for future in futures:
                item, tiles = writing.pop(future)
                try:
                    result = future.result()
                except Exception as error:  # noqa: BLE001
                    result = {"ok": False, "error": f"worker failed: {error!r}", "started": None, "finished": None}
                self._finish(item, result["ok"], result.get("error"), result["started"], result["finished"], tiles)

        def harvest_streams() -> None:
            for stream in list(streams):
                state = stream.poll()
                if state is not None:
                    streams.remove(stream)
                    self._finish(stream.item, state, stream.error, stream.started, time.time(), stream.count)

        def idle() -> bool:
            return not (todo or decoding or ready or waiting or any(s.next_chunk_left for s in streams))

        for item, decoded in preloaded:
            accept(item, decoded)
        try:
            while True:
                submit_decodes()
                harvest_decodes([f for f in list(decoding) if f.done()])
                harvest_streams()
                if not ready:
                    if decoding:
                        done, _ = wait(list(decoding), return_when=FIRST_COMPLETED)
                        harvest_decodes(list(done))
                        continue
                    if not self.encoder.fatal and not idle():
                        if not todo and streams:
                            time.sleep(0.01)  # streamed scenes wait for their writer to free a slot
                        continue
                    break
                chunk: list[tuple[Item | Chunk, dict[str, Any]]] = []
                chunk_tiles = 0
                while ready and chunk_tiles < self.chunk_tiles:
                    unit, decoded = ready.popleft()
                    ready_tiles -= decoded["count"]
                    if isinstance(unit, Chunk) and unit.stream.error is not None:
                        continue  # its scene already failed
                    chunk.append((unit, decoded))
                    chunk_tiles += decoded["count"]
                submit_decodes()  # keep the pool busy while the engine runs
                for unit, decoded, outputs in self._run_engine(chunk):
                    if isinstance(unit, Chunk):
                        unit.stream.outputs(unit.start, outputs)
                        continue
                    future = self.pool.submit(
                        write_prediction, self.spec, unit.index, outputs_to_wire(outputs), decoded["pending"],
                        str(unit.output), decoded["started"],
                    )
                    writing[future] = (unit, len(outputs))
                harvest_writes([f for f in list(writing) if f.done()])
                # Bounded memory: at most two chunks of outputs wait for the pool or the stream writer
                # (the engine only waits here when writing falls behind inference for good).
                while sum(tiles for _, tiles in writing.values()) > 2 * self.chunk_tiles:
                    done, _ = wait(list(writing), return_when=FIRST_COMPLETED)
                    harvest_writes(list(done))
                for stream in streams:
                    if stream.backlog > 2 * self.chunk_tiles:
                        stream.wait()
                if self.encoder.fatal:
                    while ready:
                        unit, decoded = ready.popleft()
                        if isinstance(unit, Item):
                            self._finish(unit, False, f"inference failed: {self.encoder.fatal}", decoded["started"])
                    for stream in streams:
                        stream.fail(f"inference failed: {self.encoder.fatal}")
                    while waiting:
                        item, decoded = waiting.popleft()
                        self._finish(item, False, f"inference failed: {self.encoder.fatal}", decoded["started"])
            if writing:
                done, _ = wait(list(writing))
                harvest_writes(list(done))
            while streams:
                for stream in streams:
                    stream.wait()
                harvest_streams()
                time.sleep(0.01)
        except KeyboardInterrupt:
            self.stats.interrupted = True
            for future in decoding:
                future.cancel()
            for stream in streams:
                if stream.closing is None:  # not every tile inferred: dropped, never half written
                    stream.fail("interrupted")
            if writing or streams:
                self.progress.message(
                    f"{PROG}: interrupted; finishing the {len(writing)} outputs already inferred (Ctrl-C again to stop now)"
                )
                try:
                    done, _ = wait(list(writing))
                    harvest_writes(list(done))
                    self.writer_thread.shutdown(wait=True)
                    for stream in streams:
                        if stream.poll():  # the scenes whose last row was being written when Ctrl-C came
                            self._finish(stream.item, True, None, stream.started, time.time(), stream.count)
                except KeyboardInterrupt:
                    pass
        finally:
            self.writer_thread.shutdown(wait=True, cancel_futures=False)
            self.stats.wall_s = time.monotonic() - start
        return self.stats


def run_local(args: argparse.Namespace, todo: list[Item], *, model_dir: Path, plugin: str,
               engine_options: dict[str, Any], meta: dict[str, Any], llm: Any = None) -> PipelineStats:
    # Scenes are prepared at float64 and cast to the engine's dtype just before inference (one
    # rounding, as `prepare` at that dtype does), so decoding needs no engine and starts at once.
    envs.predict_gdal_cache()
    spec = ProcessorSpec(str(model_dir), plugin, "float64", args.indices, stream_pixels=0 if args.cog else args.stream_pixels or None)
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init,
                               initargs=(os.getpid(),))
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
        probe = pipeline_class(plugin).for_model_folder(model_dir, dtype)  # fails here if the processor cannot serve the model
        max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        device = str(getattr(getattr(vllm_config, "device_config", None), "device_type", None) or "cpu")
        chunk_tiles = args.chunk_tiles or default_chunk_tiles(probe, max_num_seqs, device)
        meta |= {"dtype": dtype_name(dtype), "max_num_seqs": max_num_seqs, "chunk_tiles": chunk_tiles,
                 "workers": args.workers}
        if owned:
            meta["engine_options"] = {k: v for k, v in kwargs.items() if k != "model"}
        for future in warmups:
            future.result()

        progress.start()
        pipeline = LocalPipeline(spec, pool, SceneEncoder(engine_encode(llm), dtype), chunk_tiles=chunk_tiles,
                                 workers=args.workers, progress=progress, cog=args.cog)
        stats = pipeline.run(list(remaining), preloaded=preloaded)
        return stats
    except KeyboardInterrupt:
        stats.interrupted = True
        return stats
    finally:
        progress.close()
        stats.peak_rss_bytes = peak_rss_bytes([os.getpid(), *(getattr(pool, "_processes", None) or {})])
        pool.shutdown(wait=True, cancel_futures=True)
        if owned and llm is not None:
            shutdown_engine(llm)
