"""Keep the API server's event loop answering while one request hands many tiles to the engine.

Each tile of a `/pooling` request is its own engine request. vLLM's `_prepare_generators` makes one
`AsyncLLM.encode` generator per tile and `merge_async_iterators` starts them all in one event-loop
iteration, so every tile's `add_request` (serialising its tensors and sending them to the engine
core) runs back to back before the loop polls its sockets again. Measured on the 2-core CPU with
the tiny model (64² tiles, benchmarks/online.py --mix): about 0.6 ms per tile, so a 2048² scene
(1849 tiles) held the loop for 1.0-1.3 s; GET /health, other clients' requests and the engine's
outputs all waited that long. Decoding and tiling were not the cause: they run in the IO
processor's threads and the loop answered throughout them.

`SubmissionPacer` lets at most SUBMISSIONS_PER_TURN `add_request` calls start per loop iteration;
the rest wait their turn, first come first served, with the loop polling its sockets between turns.
The work and its order are unchanged: the first turn starts at once, and the engine gets a
request's tiles as fast as before, only interleaved with everything else the server does. This
module is plain asyncio; the vLLM side (wrapping `AsyncLLM.add_request`) is the shim
`compat.pace_engine_submissions`, installed with our IO processors (processor.py), so only a
server that serves our model is paced.
"""

from __future__ import annotations

import asyncio
import collections
import weakref

# ~20 ms of the loop per turn at the measured 0.6 ms per tile on a 2-core CPU.
SUBMISSIONS_PER_TURN = 32


class SubmissionPacer:
    """At most `per_turn` callers of `turn()` pass per event-loop iteration, in arrival order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_turn: int = SUBMISSIONS_PER_TURN) -> None:
        self._loop = weakref.ref(loop)  # weak, or `_pacers` (keyed by the loop) would keep every loop
        self.per_turn = per_turn
        self._passed = 0  # callers let through since the last turn began
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._turn_scheduled = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:
            raise RuntimeError("this pacer's event loop is gone")
        return loop

    async def turn(self) -> None:
        if not self._waiting and self._passed < self.per_turn:
            self._passed += 1
            self._schedule_turn()
            return
        waiter = self.loop.create_future()
        self._waiting.append(waiter)
        self._schedule_turn()
        await waiter

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """Runs one iteration after the last: lets the next `per_turn` waiters go (they resume in
        the iteration after this one, and the turn after them is scheduled for that iteration)."""
        self._turn_scheduled = False
        self._passed = 0
        while self._waiting and self._passed < self.per_turn:
            waiter = self._waiting.popleft()
            if not waiter.done():  # a cancelled caller (its client left) takes no place
                waiter.set_result(None)
                self._passed += 1
        if self._waiting or self._passed:
            self._schedule_turn()


# Weak: a closed loop (tests run many) takes its pacer with it.
_pacers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SubmissionPacer] = weakref.WeakKeyDictionary()


def pacer_for(loop: asyncio.AbstractEventLoop, per_turn: int = SUBMISSIONS_PER_TURN) -> SubmissionPacer:
    """The running loop's pacer (one loop per API-server process; a new loop gets a new one)."""
    pacer = _pacers.get(loop)
    if pacer is None:
        pacer = _pacers[loop] = SubmissionPacer(loop, per_turn)
    return pacer
