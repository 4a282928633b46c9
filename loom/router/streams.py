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


async def with_keepalive(events: AsyncIterator[bytes], interval: float = KEEPALIVE_SECONDS) -> AsyncIterator[bytes]:
    """Forward `events`, inserting keep-alive comments while waiting. Closing this generator (client gone)
    cancels the pending read and closes `events`, so its cleanup (aborting the request) runs."""
    pending: asyncio.Task | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield b":\n\n"
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration, Exception):  # noqa: BLE001 — already handled
                pass
        await events.aclose()
