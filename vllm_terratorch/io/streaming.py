"""Served scenes larger than the server holds in memory (issue #18): a `path` request for a `path`
output whose input exceeds `max_pixels`, `max_raster_bytes` or `max_bytes` is answered window by
window instead of refused. `max_pixels` then bounds what is held at once, not the scene.

`StreamedRequest` is the vLLM-free half: it opens the request's file(s) by window (`WindowedScene`),
hands out the tiles a chunk at a time as engine prompts, blends and writes the outputs as they come
(`SceneWriter`) into a staged server output (`OutputPolicy.stage`: the same folder checks and
never-overwrite rule as any `path` output) and publishes the file when the last row is written.
Driving vLLM's engine a chunk at a time is engine/compat.py's `stream_large_requests`.

A b64_json or url input is never streamed (it arrives whole; its caps stand), nor is a request
answered inline, a classification, or a model whose inputs its datamodule reads.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from vllm_terratorch.core.inputs import tile_prompts
from vllm_terratorch.errors import RequestError
from vllm_terratorch.io.geotiff import RasterHeader
from vllm_terratorch.io.pipeline import GeoTiffPipeline
from vllm_terratorch.io.schema import GeoTiffRequest, PredictionOutput, parse_request
from vllm_terratorch.io.windows import SceneWriter, WindowedScene

# Chunks of a streamed request in the engine at once: one being computed while the next is queued.
LOOKAHEAD = 2


def may_stream(data: object) -> bool:
    """Whether a request's raw `data` asks for what can be streamed, a `path` input to a `path` output:
    decided before any parsing or file access, so every other request pays nothing for streaming
    (both fields are plain literals, so this is the parsed request's answer too)."""
    return isinstance(data, dict) and data.get("data_format") == "path" and data.get("out_data_format") == "path"


def _held_whole_refused(pipeline: GeoTiffPipeline, path: Path) -> bool:
    """Whether reading `path` whole would break one of the server's size limits."""
    import rasterio
    from rasterio.errors import RasterioError

    if os.stat(path).st_size > pipeline.settings.max_bytes:
        return True
    try:
        with rasterio.open(path) as source:
            header = RasterHeader.of(source)
    except (RasterioError, OSError):
        return False  # the in-memory path says what is wrong with it
    try:
        pipeline.limits.check(header)
    except RequestError:
        return True
    return False


class StreamedRequest:
    """One `/pooling` request served window by window: its chunks of tiles, their prompts, its output."""

    @classmethod
    def open(cls, pipeline: GeoTiffPipeline, data: object, request_id: str | None) -> StreamedRequest | None:
        """The stream for a request that is to be streamed, else None (the request takes the in-memory
        path, which also reports whatever is wrong with it). Errors of a streamed request (its output
        path, its files' bands or grids) are raised here, before any model time."""
        if not may_stream(data):
            return None
        try:
            request = parse_request(data)
            if not WindowedScene.supports(pipeline, request):
                return None
            paths = [pipeline.policy.local_file(item) for item in request.items]
            if not any(_held_whole_refused(pipeline, path) for path in paths):
                return None
        except (RequestError, ValueError, OSError):
            return None
        return cls(pipeline, request, paths, request_id)

    def __init__(self, pipeline: GeoTiffPipeline, request: GeoTiffRequest, paths: list[Path], request_id: str | None) -> None:
        self.started = time.monotonic()
        self.pipeline, self.request_id = pipeline, request_id
        output = pipeline.output_target(request, request_id)
        assert output is not None  # a raster, out_data_format "path"
        self.scene = WindowedScene(pipeline, request, paths)
        try:
            self.writer = SceneWriter(self.scene, pipeline.outputs.stage(output))
        except BaseException:
            self.scene.close()
            raise
        c = pipeline.tiling
        # What the engine holds of this request at once (LOOKAHEAD chunks) stays within max_pixels.
        self.chunk_tiles = max(1, pipeline.settings.max_pixels // (LOOKAHEAD * c.h_crop * c.w_crop))
        self.count = len(self.scene.plan)
        self._lock = threading.Lock()  # the writer is used from the IO threads, one call at a time
        self.decode_s = self.encode_s = 0.0
        self.closed = False

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """Runs of tiles, in plan order: (start, stop)."""
        return [(start, min(start + self.chunk_tiles, self.count)) for start in range(0, self.count, self.chunk_tiles)]

    def prompts(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Engine prompts of tiles `start` .. `stop - 1`, read from the file(s) by window."""
        began = time.monotonic()
        with self._lock:
            self._check_open()
            tiles = self.scene.tiles(start, stop)
        self.decode_s += time.monotonic() - began
        return tile_prompts(tiles, self.scene.extras)

    def add(self, outputs: list[torch.Tensor]) -> None:
        """The next chunk's tile outputs, in plan order: blends them and writes the rows they finish."""
        began = time.monotonic()
        with self._lock:
            self._check_open()
            self.writer.add(outputs)
        self.encode_s += time.monotonic() - began

    def finish(self) -> PredictionOutput:
        """Publish the output once every tile's output is in; the request's answer."""
        began = time.monotonic()
        with self._lock:
            self._check_open()
            try:
                path = self.writer.close()
            finally:
                self._close()
        self.encode_s += time.monotonic() - began
        elapsed = time.monotonic() - self.started
        timings = {"decode_s": round(self.decode_s, 6), "engine_s": round(elapsed - self.decode_s - self.encode_s, 6),
                   "encode_s": round(self.encode_s, 6)}
        return PredictionOutput(data_format="path", data=str(path), request_id=self.request_id, timings=timings)

    def abort(self) -> None:
        """Drop the partial output (the request failed or its client left); nothing is published."""
        with self._lock:
            if not self.closed:
                self.writer.abort()
                self._close()

    def _close(self) -> None:
        self.scene.close()
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RequestError("this streamed request was already finished or aborted")
