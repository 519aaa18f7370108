"""engine/pacing.py: the event loop lets a bounded number of engine submissions start per iteration,
in arrival order, and polls between turns; a lone submission never waits."""

from __future__ import annotations

import asyncio
import gc

import pytest

from vllm_terratorch.engine.pacing import SubmissionPacer, _pacers, pacer_for


class IterationClock:
    """Counts event-loop iterations: a callback that reschedules itself runs once per iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.now, self.running = loop, 0, True
        loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.now += 1
        if self.running:
            self.loop.call_soon(self._tick)


async def submit_all(pacer: SubmissionPacer, clock: IterationClock, count: int) -> list[tuple[int, int]]:
    """`count` tasks started in one iteration, as vLLM's merge_async_iterators starts a request's
    tiles; each records (its index, the iteration in which its turn came)."""
    passed: list[tuple[int, int]] = []

    async def one(index: int) -> None:
        await pacer.turn()
        passed.append((index, clock.now))

    await asyncio.gather(*(asyncio.ensure_future(one(i)) for i in range(count)))
    return passed


def test_at_most_per_turn_per_iteration_in_order():
    async def scenario() -> list[tuple[int, int]]:
        loop = asyncio.get_running_loop()
        clock = IterationClock(loop)
        passed = await submit_all(SubmissionPacer(loop, per_turn=8), clock, 50)
        clock.running = False
        return passed

    passed = asyncio.run(scenario())
    assert [index for index, _ in passed] == list(range(50))  # first come, first served
    per_iteration: dict[int, int] = {}
    for _, iteration in passed:
        per_iteration[iteration] = per_iteration.get(iteration, 0) + 1
    assert max(per_iteration.values()) <= 8
    assert len(per_iteration) == 7  # ceil(50 / 8) turns, one iteration each


def test_a_lone_submission_does_not_wait():
    async def scenario() -> bool:
        pacer = SubmissionPacer(asyncio.get_running_loop(), per_turn=4)
        turn = pacer.turn()
        try:
            turn.send(None)  # runs to completion without suspending
        except StopIteration:
            return True
        return False

    assert asyncio.run(scenario())


def test_a_cancelled_waiter_takes_no_place():
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        pacer = SubmissionPacer(loop, per_turn=2)
        order: list[int] = []

        async def one(index: int) -> None:
            await pacer.turn()
            order.append(index)

        tasks = [asyncio.ensure_future(one(i)) for i in range(6)]
        await asyncio.sleep(0)  # every task has reached its turn() (the first two passed)
        tasks[2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return order

    assert asyncio.run(scenario()) == [0, 1, 3, 4, 5]


def test_one_pacer_per_loop_and_none_kept_after_it():
    async def current() -> int:
        loop = asyncio.get_running_loop()
        assert pacer_for(loop) is pacer_for(loop) and pacer_for(loop).loop is loop
        return id(pacer_for(loop))

    asyncio.run(current())
    asyncio.run(current())
    gc.collect()
    assert len(_pacers) == 0  # a closed loop takes its pacer with it


def test_the_turn_size_comes_from_the_environment(monkeypatch):
    from vllm_terratorch import envs
    from vllm_terratorch.errors import ConfigError

    monkeypatch.delenv("VLLM_TERRATORCH_SUBMISSIONS_PER_TURN", raising=False)
    assert envs.submissions_per_turn(32) == 32
    monkeypatch.setenv("VLLM_TERRATORCH_SUBMISSIONS_PER_TURN", "0")
    assert envs.submissions_per_turn(32) == 0  # off: vLLM's own behaviour
    monkeypatch.setenv("VLLM_TERRATORCH_SUBMISSIONS_PER_TURN", "many")
    with pytest.raises(ConfigError, match="SUBMISSIONS_PER_TURN='many' is not a whole number"):
        envs.submissions_per_turn(32)
