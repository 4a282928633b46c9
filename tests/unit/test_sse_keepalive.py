"""router/streams.with_keepalive: events in order, a `:` comment per silence, errors raised, and closing the stream
(client gone) closes the events (whose cleanup aborts the request)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from loom.router.streams import with_keepalive


async def _events(log: list[str], delays: list[float], fail: bool = False):
    try:
        for i, delay in enumerate(delays):
            await asyncio.sleep(delay)
            yield f"e{i}".encode()
        if fail:
            raise RuntimeError("engine lost")
    finally:
        log.append("closed")


def test_events_in_order_with_keepalives_in_silences():
    async def run():
        log: list[str] = []
        out = [chunk async for chunk in with_keepalive(_events(log, [0, 0, 0.25, 0]), interval=0.1)]
        return out, log

    out, log = asyncio.run(run())
    assert [c for c in out if c != b":\n\n"] == [b"e0", b"e1", b"e2", b"e3"]
    assert out[:2] == [b"e0", b"e1"] and 1 <= out.count(b":\n\n") <= 3 and out.index(b"e2") > 2
    assert log == ["closed"]


def test_an_error_of_the_events_is_raised():
    async def run():
        log: list[str] = []
        got = []
        with pytest.raises(RuntimeError, match="engine lost"):
            async for chunk in with_keepalive(_events(log, [0, 0], fail=True), interval=1.0):
                got.append(chunk)
        return got, log

    got, log = asyncio.run(run())
    assert got == [b"e0", b"e1"] and log == ["closed"]


def test_closing_the_stream_closes_the_events():
    async def run():
        log: list[str] = []
        async with aclosing(with_keepalive(_events(log, [0, 10.0]), interval=5.0)) as stream:
            async for chunk in stream:
                assert chunk == b"e0"
                break  # the client goes away while the next event is pending
        await asyncio.sleep(0)
        return log

    assert asyncio.run(run()) == ["closed"]
