"""Shims in the API server, installed with our IO processors: large `path` requests streamed a
chunk of tiles at a time, pre-processing off the event loop, and tiles entering the engine a loop
turn at a time."""

from __future__ import annotations

import asyncio
import collections
import copy
import inspect
import sys
from collections.abc import Callable
from typing import Any

from vllm_terratorch import envs
from vllm_terratorch.engine.compat.patching import wrap_once

# Chunks of one streamed request in the engine at once: one being computed while the next is queued.
STREAM_LOOKAHEAD = 2


def stream_large_requests() -> None:
    """Serve a `/pooling` request too large to hold (io/streaming.py) a chunk of tiles at a time.

    vLLM 0.26 and 0.32 turn a plugin request into all its prompts at once (`pre_process`), run them
    all and post-process all outputs together: a request's whole scene is in memory. For a request
    our processor streams (`open_stream`: a `path` input over the size limits, a `path` output), this
    replaces that request's way through `PoolingBaseServing.__call__`: vLLM's own context
    (`_init_ctx`), then for each chunk of tiles vLLM's own stages on a copy of it with the chunk's
    request id (pre-processing, whose `pre_process` returns the prompts given to `stage_chunk`;
    `_prepare_generators`; `_collect_batch`), STREAM_LOOKAHEAD chunks in the engine at most, each
    chunk's outputs handed to the stream in order (blended and written in the processor's IO
    threads); then vLLM's own post-processing, whose `post_process` publishes the file. An error, or
    a client that leaves (vLLM cancels the handler), aborts the stream: its engine requests are
    aborted and no file is left. Every other request takes vLLM's path unchanged. (0.32: `async
    _preprocessing`; 0.26: `_preprocessing_async`, a plain function run in a thread.)
    """
    serving = sys.modules.get("vllm.entrypoints.pooling.base.serving")
    PoolingBaseServing = getattr(serving, "PoolingBaseServing", None)  # noqa: N806 - a class
    stages = ("_init_ctx", "_prepare_generators", "_collect_batch", "_postprocessing")  # (the *_async are per instance)
    if PoolingBaseServing is None or not all(hasattr(PoolingBaseServing, stage) for stage in stages):
        return

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        async def call(self: Any, request: Any, raw_request: Any = None) -> Any:
            io_processor = self.get_io_processor(request)
            plugin = getattr(io_processor, "io_processor", None)
            data = getattr(request, "data", None)
            if not hasattr(plugin, "may_stream") or not plugin.may_stream(data):  # no I/O: path in, path out
                return await current(self, request, raw_request)
            loop = asyncio.get_running_loop()
            ctx = await self._init_ctx(io_processor, request, raw_request)
            stream = await loop.run_in_executor(plugin.io_executor, plugin.open_stream, data, ctx.request_id)
            if stream is None:
                return await current(self, request, raw_request)
            chunk_ids: list[str] = []
            try:
                await _run_stream(self, io_processor, plugin, ctx, stream, chunk_ids)
                ctx.final_res_batch = []
                return await self._postprocessing_async(io_processor, ctx)  # publishes the output
            finally:  # in an IO thread: it waits for a write in progress; nothing is left after a publish
                plugin.io_executor.submit(plugin.drop_stream, ctx.request_id, chunk_ids)

        return call

    wrap_once(PoolingBaseServing, "__call__", wrap)


async def _run_stream(serving: Any, io_processor: Any, plugin: Any, ctx: Any, stream: Any, chunk_ids: list[str]) -> None:
    """Every chunk of `stream` through the engine, at most STREAM_LOOKAHEAD at once, outputs in order."""
    loop = asyncio.get_running_loop()
    executor = plugin.io_executor

    async def run_chunk(start: int, stop: int) -> list[Any]:
        part = copy.copy(ctx)
        part.request_id = f"{ctx.request_id}-part{start}"
        part.engine_inputs, part.result_generator, part.final_res_batch = None, None, []
        chunk_ids.append(part.request_id)
        plugin.stage_chunk(part.request_id, await loop.run_in_executor(executor, stream.prompts, start, stop))
        preprocessing = getattr(serving, "_preprocessing_async", None) or serving._preprocessing
        await preprocessing(io_processor, part)
        await serving._prepare_generators(part)
        await serving._collect_batch(part)
        return [result.outputs.data for result in part.final_res_batch]

    in_flight: collections.deque[asyncio.Future[list[Any]]] = collections.deque()
    try:
        for start, stop in stream.chunks:
            in_flight.append(asyncio.ensure_future(run_chunk(start, stop)))
            if len(in_flight) >= STREAM_LOOKAHEAD:
                await loop.run_in_executor(executor, stream.add, await in_flight.popleft())
        while in_flight:
            await loop.run_in_executor(executor, stream.add, await in_flight.popleft())
    finally:
        for task in in_flight:
            task.cancel()  # their engine requests are aborted as their generators close
        await asyncio.gather(*in_flight, return_exceptions=True)


class _PrecomputedRequests:
    """A vLLM pooling IO processor whose online request factory has already run (elsewhere)."""

    def __init__(self, inner: Any, requests: Any) -> None:
        self._inner = inner
        self._requests = requests

    def get_request_factory_online(self, ctx: Any) -> Any:
        return self._requests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def preprocess_off_the_event_loop() -> None:
    """Run our IO processors' `pre_process` in their own worker pool, not on the server's event loop.

    vLLM 0.32 builds an online plugin request (`get_request_factory_online`, which calls
    `IOProcessor.pre_process`) synchronously inside the coroutine `PoolingBaseServing._preprocessing`,
    so a download or a decode there stalls every client and `/health`; `pre_process_async` is never
    called. We wrap that coroutine: when the request's plugin is one of ours (it has an
    `io_executor`), the factory runs in that executor and vLLM's own coroutine continues with the
    result; every other processor takes vLLM's path unchanged. vLLM 0.26 already runs
    `_preprocessing` (a plain function) in a thread pool: nothing to do there. Called when one of
    our processors is created: in the API server the serving module is imported by then (its
    serving object creates the processor); elsewhere (offline `LLM`, `predict`) there is no event
    loop to protect and nothing is imported for it.
    """
    serving = sys.modules.get("vllm.entrypoints.pooling.base.serving")
    PoolingBaseServing = getattr(serving, "PoolingBaseServing", None)  # noqa: N806 - a class
    if PoolingBaseServing is None:
        return
    if not inspect.iscoroutinefunction(getattr(PoolingBaseServing, "_preprocessing", None)):
        return  # vLLM 0.26: a plain function, already run off the loop

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        async def preprocessing(self: Any, io_processor: Any, ctx: Any) -> Any:
            executor = getattr(getattr(io_processor, "io_processor", None), "io_executor", None)
            if executor is None:
                return await current(self, io_processor, ctx)
            loop = asyncio.get_running_loop()
            requests = await loop.run_in_executor(executor, io_processor.get_request_factory_online, ctx)
            return await current(self, _PrecomputedRequests(io_processor, requests), ctx)

        return preprocessing

    wrap_once(PoolingBaseServing, "_preprocessing", wrap)


def pace_engine_submissions() -> None:
    """Make each `AsyncLLM.add_request` (vLLM 0.26 and 0.32, an async method) wait for its turn
    of the running loop's `SubmissionPacer` first (engine/pacing.py says why). Applied in the API
    server, where vLLM has imported `vllm.v1.engine.async_llm` by the time our processor is
    created; the offline `LLM` has no event loop to protect, and nothing is wrapped there.
    VLLM_TERRATORCH_SUBMISSIONS_PER_TURN sets the turn's size; 0 leaves vLLM's behaviour (envs.py)."""
    from vllm_terratorch.engine.pacing import SUBMISSIONS_PER_TURN, pacer_for

    per_turn = envs.submissions_per_turn(SUBMISSIONS_PER_TURN)
    if per_turn == 0:
        return
    module = sys.modules.get("vllm.v1.engine.async_llm")
    AsyncLLM = getattr(module, "AsyncLLM", None)  # noqa: N806 - a class
    if AsyncLLM is None or not inspect.iscoroutinefunction(getattr(AsyncLLM, "add_request", None)):
        return

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        async def add_request(self: Any, *args: Any, **kwargs: Any) -> Any:
            await pacer_for(asyncio.get_running_loop(), per_turn).turn()
            return await current(self, *args, **kwargs)

        return add_request

    wrap_once(AsyncLLM, "add_request", wrap)
