"""router/handlers.RequestLifecycle: each request's outcome is counted exactly once, whatever ends it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from loom.router.errors import GenerationError, OverloadedError
from loom.router.generation import GenerationResult, Timings
from loom.router.handlers import Outcome, RequestLifecycle
from loom.router.metrics import Metrics
from loom.router.state import Permits, RouterState


class FakeGenerator:
    def __init__(self, behaviour: str):
        self.behaviour = behaviour

    async def generate(self, vreq, timings: Timings) -> GenerationResult:
        if self.behaviour == "fail":
            raise GenerationError("boom")
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        timings.first_token = timings.end = timings.start
        return GenerationResult("text", "length", [], [], [], None, 3, timings)


def make_state(behaviour: str, permits: int = 4) -> RouterState:
    state = RouterState.__new__(RouterState)  # only what the lifecycle touches
    state.metrics = Metrics(10, 20, 100)
    state.permits = Permits(permits)
    state.generator = FakeGenerator(behaviour)
    state.draining = False
    return state


def counts(state: RouterState) -> dict[str, float]:
    m = state.metrics
    out = {"success": m.request_success._value.get()}
    for outcome in Outcome:
        if outcome is not Outcome.SUCCESS:
            out[outcome.value] = m.request_failure.labels(outcome.value)._value.get()
    return {k: v for k, v in out.items() if v}


async def _generate(state: RouterState, n: int = 1):
    async with RequestLifecycle(state) as life:
        return await life.generate(SimpleNamespace(), n)


def test_success_is_counted_per_generation():
    state = make_state("ok")
    results = asyncio.run(_generate(state, n=2))
    assert len(results) == 2 and counts(state) == {"success": 2.0} and state.permits.in_use == 0


@pytest.mark.parametrize("behaviour,permits,error,outcome", [
    ("fail", 4, GenerationError, "generation"),
    ("ok", 1, OverloadedError, "overloaded"),  # best_of=2 needs two permits at once
])
def test_a_failure_is_counted_once(behaviour, permits, error, outcome):
    state = make_state(behaviour, permits)
    with pytest.raises(error):
        asyncio.run(_generate(state, n=2))
    assert counts(state) == {outcome: 1.0} and state.permits.in_use == 0


def test_a_cancelled_request_is_dropped_once():
    state = make_state("hang")

    async def run():
        task = asyncio.ensure_future(_generate(state))
        await asyncio.sleep(0.05)
        assert state.permits.in_use == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert counts(state) == {"dropped": 1.0} and state.permits.in_use == 0
