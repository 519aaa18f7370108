"""Scenes too large to hold, in `predict` (issue #18): read, inferred and written in chunks of tiles.

A scene over `--stream-pixels` never exists whole in any process. Its tiles are read by window in
the worker pool, a chunk at a time (`decode_chunk`), in plan order, a bounded number ahead of the
engine; chunks share engine calls with other scenes' tiles like any decoded scene; their outputs
are blended and written behind the engine by one writer thread (`SceneWriter`: finished rows go to
a temporary file, renamed when the last row is written). A failure anywhere fails that scene only
and leaves no output file.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_terratorch.predict.inputs import Item
from vllm_terratorch.predict.tasks import ProcessorSpec, describe_error, get_pipeline, scene_request


class SceneStream:
    """One streamed scene: which chunks are still to read, outputs put back in plan order, the writer."""

    def __init__(self, item: Item, spec: ProcessorSpec, chunk_tiles: int, writer_thread: ThreadPoolExecutor,
                 *, cog: bool, started: float | None) -> None:
        from vllm_terratorch.io.windows import SceneWriter, WindowedScene

        self.item = item
        self.chunk_tiles = chunk_tiles
        self.started = started or time.time()
        pipeline = get_pipeline(spec)
        request, files = scene_request(pipeline, str(item.source), list(spec.indices) if spec.indices is not None else None)
        self.scene = WindowedScene(pipeline, request, files)  # here: the nodata mask of each finished row band
        self.count = len(self.scene.plan)
        self.writer = SceneWriter(self.scene, Path(item.output), cog=cog)
        self.thread = writer_thread
        self.handed = 0  # tiles handed out for reading
        self.added = 0  # tiles given to the writer, in order
        self.early: dict[int, list[Any]] = {}  # outputs that came back before an earlier chunk's
        self.work: list[tuple[Future[Any], int]] = []  # writer tasks and their tile counts
        self.closing: Future[Any] | None = None
        self.error: str | None = None

    @property
    def next_chunk_left(self) -> bool:
        return self.error is None and self.handed < self.count

    def next_chunk(self) -> tuple[int, int] | None:
        """The next run of tiles to read, or None when every tile has been handed out."""
        if not self.next_chunk_left:
            return None
        start, self.handed = self.handed, min(self.handed + self.chunk_tiles, self.count)
        return start, self.handed

    def outputs(self, start: int, outputs: list[Any]) -> None:
        """A chunk's tile outputs (in any order of chunks): the writer gets them in plan order."""
        if self.error is not None:
            return
        self.early[start] = outputs
        while self.added in self.early:
            ready = self.early.pop(self.added)
            self.work.append((self.thread.submit(self.writer.add, ready), len(ready)))
            self.added += len(ready)
        if self.added == self.count and self.closing is None:
            self.closing = self.thread.submit(self.writer.close)

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
            self.early.clear()
            for future, _ in self.work:
                future.cancel()
            self.thread.submit(self._abort)

    def _abort(self) -> None:
        self.writer.abort()
        self.scene.close()

    @property
    def backlog(self) -> int:
        """Tiles whose outputs wait for the writer (held in memory)."""
        return sum(tiles for future, tiles in self.work if not future.done()) + sum(map(len, self.early.values()))

    def poll(self) -> bool | None:
        """None while running; True once written, False once failed (`error` says why)."""
        for future, _ in self.work:
            if future.done() and not future.cancelled() and future.exception() is not None:
                self.fail(describe_error(future.exception()))  # type: ignore[arg-type]
        self.work = [(future, tiles) for future, tiles in self.work if not future.done()]
        if self.error is not None:
            return False
        if self.closing is None or not self.closing.done():
            return None
        error = self.closing.exception()
        self.scene.close()
        if error is not None:
            self.error = describe_error(error)
            return False
        return True

    def wait(self) -> None:
        """Block until the writer has caught up with what it was given."""
        for future, _ in list(self.work):
            try:
                future.result()
            except Exception:  # noqa: BLE001 - seen by poll
                pass


@dataclass(frozen=True)
class Chunk:
    """A run of a streamed scene's tiles, as a unit of the engine queue."""

    stream: SceneStream
    start: int
    stop: int
