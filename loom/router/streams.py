"""Server-sent events as TGI frames them: `data:` + compact JSON + blank line (no space after the colon), and a
`:` comment every 15 s of silence to keep proxies from closing the connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

KEEPALIVE_SECONDS = 15.0
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sse_data(payload: str) -> bytes:
    return f"data:{payload}\n\n".encode()


_END = object()  # the events are exhausted
_KEEPALIVE = object()  # `interval` passed without an event


async def with_keepalive(events: AsyncIterator[bytes], interval: float = KEEPALIVE_SECONDS) -> AsyncIterator[bytes]:
    """Forward `events`, inserting keep-alive comments while waiting. One task reads `events` for the whole stream
    and a timer marks each silence (not a task per event: at one token per event that was a task per token).
    Closing this generator (client gone) cancels the reader and closes `events`, so its cleanup (aborting the
    request) runs; an exception raised by `events` is raised here."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        try:
            async for chunk in events:
                queue.put_nowait(chunk)
        except BaseException as err:  # noqa: BLE001 — handed to the consumer, which raises it
            queue.put_nowait(err)
            if isinstance(err, asyncio.CancelledError):
                raise
        else:
            queue.put_nowait(_END)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            timer = None if not queue.empty() else loop.call_later(interval, queue.put_nowait, _KEEPALIVE)
            try:
                item = await queue.get()
            finally:
                if timer is not None:
                    timer.cancel()
            if item is _END:
                return
            if item is _KEEPALIVE:
                yield b":\n\n"
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        if not reader.done():
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 — already handled
                pass
        await events.aclose()
