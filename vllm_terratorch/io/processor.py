"""IO processors for `/pooling`: thin vLLM adapters around the GeoTIFF pipeline (pipeline.py).

All tiles of a request are returned as separate prompts, so vLLM batches them (with other
requests' tiles). What finishing a request needs lives between pre- and post-processing in a
bounded table keyed by request id, removed when the request finishes, so failed requests cannot
pile it up. Downloads, decoding, tiling, stitching and encoding run in the processor's own thread
pool, never on vLLM's event loop, and a request's tiles enter the engine a loop turn at a time
(engine/pacing.py), so the loop keeps answering while a large scene is handed over. A `path`
request too large to hold is instead streamed a chunk of tiles at a time (io/streaming.py, driven
by compat.stream_large_requests): `may_stream`, `open_stream`, `stage_chunk` and `drop_stream` are
that driver's side of it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams

from vllm_terratorch.core.config import pretrained_cfg_of
from vllm_terratorch.engine.compat import pace_engine_submissions, preprocess_off_the_event_loop, stream_large_requests
from vllm_terratorch.errors import RequestError
from vllm_terratorch.io.pipeline import GeoTiffPipeline, Pending
from vllm_terratorch.io.tasks import ClassificationPipeline, RegressionPipeline, SegmentationPipeline
from vllm_terratorch.io.schema import GeoTiffRequest, PredictionOutput, parse_request
from vllm_terratorch.io.settings import load_io_settings
from vllm_terratorch.io.streaming import StreamedRequest, may_stream
from vllm_terratorch.log import logger

OFFLINE_KEY = "offline"
# Requests whose outputs never came back (engine error, client gone) are dropped after this long.
PENDING_TTL_S = 3600.0
PENDING_MAX = 4096


class GeoTiffProcessor(IOProcessor):
    """vLLM's IOProcessor interface over one task's `GeoTiffPipeline`."""

    pipeline_class: ClassVar[type[GeoTiffPipeline]]

    def __init__(self, vllm_config: Any, renderer: Any = None) -> None:
        super().__init__(vllm_config, renderer)
        model_config = vllm_config.model_config
        self.pipeline = self.pipeline_class(
            pretrained_cfg_of(model_config.hf_config, model_config.model),
            model_config.dtype,
            load_io_settings(),
            getattr(model_config, "allowed_local_media_path", None),
            getattr(model_config, "allowed_media_domains", None),
        )
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        self._lock = threading.Lock()
        self._streams: dict[str, StreamedRequest] = {}
        self._chunks: dict[str, list[dict[str, Any]]] = {}  # a streamed request's next prompts, by chunk id
        self.io_executor = ThreadPoolExecutor(self.pipeline.settings.io_workers, thread_name_prefix="vllm-terratorch-io")
        preprocess_off_the_event_loop()
        pace_engine_submissions()
        stream_large_requests()
        logger.info("vllm-terratorch: %s", self.pipeline.describe())

    def parse_data(self, data: object) -> GeoTiffRequest:
        return parse_request(data)

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        params = params or PoolingParams(task="plugin")
        if params.task is None:
            params.task = "plugin"
        return params

    def pre_process(self, prompt: Any, request_id: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        with self._lock:
            chunk = self._chunks.pop(request_id, None) if request_id is not None else None
        if chunk is not None:
            return chunk
        started = time.monotonic()
        request = parse_request(prompt)
        output = self.pipeline.output_target(request, request_id)
        data = self.pipeline.read(request)
        prompts, pending = self.pipeline.prepare(data, request, started, output)
        self._remember(request_id or OFFLINE_KEY, pending)
        return prompts

    async def pre_process_async(self, prompt: Any, request_id: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io_executor, functools.partial(self.pre_process, prompt, request_id, **kwargs))

    async def post_process_async(
        self, model_output: AsyncGenerator[tuple[int, Any]], request_id: str | None = None, **kwargs: Any
    ) -> PredictionOutput:
        outputs = [output for _, output in sorted([item async for item in model_output], key=lambda item: item[0])]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io_executor, functools.partial(self.post_process, outputs, request_id, **kwargs))

    def post_process(self, model_output: Sequence[Any], request_id: str | None = None, **kwargs: Any) -> PredictionOutput:
        started = time.monotonic()
        key = request_id or OFFLINE_KEY
        with self._lock:
            stream = self._streams.pop(key, None)
            pending = self._pending.pop(key, None)
        if stream is not None:
            return stream.finish()
        if pending is None:
            raise RequestError(f"no pre-processed request {key!r} (it expired or was already answered)")
        result = self.pipeline.complete([output.outputs.data for output in model_output], pending)
        return self.pipeline.answer(result, pending, request_id, started)

    # Streamed requests (io/streaming.py), driven a chunk at a time by compat.stream_large_requests ----

    may_stream = staticmethod(may_stream)

    def open_stream(self, data: object, request_id: str) -> StreamedRequest | None:
        """A request to serve window by window (its `post_process` then publishes the output), or None."""
        stream = StreamedRequest.open(self.pipeline, data, request_id)
        if stream is not None:
            with self._lock:
                self._streams[request_id] = stream
        return stream

    def stage_chunk(self, chunk_id: str, prompts: list[dict[str, Any]]) -> None:
        """The prompts `pre_process` returns for `chunk_id` (one chunk of a streamed request)."""
        with self._lock:
            self._chunks[chunk_id] = prompts

    def drop_stream(self, request_id: str, chunk_ids: Sequence[str] = ()) -> None:
        """Forget a streamed request that failed or was cancelled: its partial output is removed."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            for chunk_id in chunk_ids:
                self._chunks.pop(chunk_id, None)
        if stream is not None:
            stream.abort()

    def _remember(self, key: str, pending: Pending) -> None:
        with self._lock:
            now = time.monotonic()
            while self._pending and (
                len(self._pending) >= PENDING_MAX or now - next(iter(self._pending.values())).created > PENDING_TTL_S
            ):
                self._pending.popitem(last=False)
            self._pending[key] = pending


class SegmentationProcessor(GeoTiffProcessor):
    __doc__ = SegmentationPipeline.__doc__
    pipeline_class = SegmentationPipeline


class RegressionProcessor(GeoTiffProcessor):
    __doc__ = RegressionPipeline.__doc__
    pipeline_class = RegressionPipeline


class ClassificationProcessor(GeoTiffProcessor):
    __doc__ = ClassificationPipeline.__doc__
    pipeline_class = ClassificationPipeline
