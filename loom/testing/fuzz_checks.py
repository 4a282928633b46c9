"""What every response of Loom's HTTP API must satisfy, whatever was sent (used by the fuzzer, loom.testing.fuzz,
and the security tests): no 5xx (except TGI's own 500 for a /vertex instance that failed), and no 424 either (a
request validation let through that the engine then failed on, reported inside streams too); a 4xx is TGI's
`{"error": str, "error_type": str}`, or one of the plain-text / empty bodies TGI itself sends (body rejections
400/413/415/422, an empty 401); errors inside event streams have their route's error shape and are never the
"incomplete" kind that only a bug produces; no error shows a file system path or a Python stack trace.
"""

from __future__ import annotations

import json
from typing import Any

LEAK_MARKERS = ("/work", "/tmp", "/home", "/root", "/usr", "site-packages", "Traceback", '.py"', "File \"")
BODY_REJECTIONS = {  # TGI's (axum's) plain-text rejections
    400: "Failed to parse the request body as JSON",
    413: "Failed to buffer the request body: length limit exceeded",
    415: "Expected request with `Content-Type: application/json`",
    422: "Failed to deserialize the JSON body into the target type",
}

VERTEX_INCOMPLETE = '{"error":"Incomplete generation","error_type":"Incomplete generation"}'
GENERATION_FAILURE = "Request failed during generation"  # TGI's GenerationError: an input validation let through


def leaks(text: str, sent: bytes = b"") -> list[str]:
    """File system paths and stack traces in `text` (markers the client sent itself excepted)."""
    return [m for m in LEAK_MARKERS if m in text and m.encode() not in sent]


def _error_shape(body: Any) -> bool:
    return isinstance(body, dict) and set(body) == {"error", "error_type"} and \
        isinstance(body["error"], str) and isinstance(body["error_type"], str)


def _stream_violations(text: str, sent: bytes) -> list[str]:
    out = []
    for chunk in text.split("\n\n"):
        if not chunk or chunk.startswith(":"):
            continue
        if not chunk.startswith("data:"):
            out.append(f"malformed SSE event {chunk[:80]!r}")
            continue
        payload = chunk[5:].strip()
        if payload == "[DONE]":
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            out.append(f"SSE event is not JSON: {payload[:80]!r}")
            continue
        if not isinstance(event, dict) or "error" not in event:
            continue
        err = event["error"]
        if isinstance(err, dict):  # OpenAI shape
            ok = set(err) == {"message", "http_status_code"} and isinstance(err["message"], str)
            message = err.get("message", "")
        else:
            ok, message = _error_shape(event), err
            if ok and event["error_type"].startswith("incomplete_generation"):
                out.append(f"stream ended by a server bug: {payload[:200]}")
        if not ok:
            out.append(f"stream error event of the wrong shape: {payload[:200]}")
        if isinstance(message, str) and message.startswith("Incomplete generation"):
            out.append(f"stream ended by a server bug: {payload[:200]}")
        if isinstance(message, str) and message.startswith(GENERATION_FAILURE):
            out.append(f"the engine failed on this request: {payload[:200]}")
        if found := leaks(payload, sent):
            out.append(f"stream error leaks {found}: {payload[:300]}")
    return out


def violations(status: int, content_type: str, body: bytes, sent: bytes = b"", route: str = "") -> list[str]:
    """What is wrong with one response (empty: nothing); `sent` is the request body (text it held may come back)."""
    text = body.decode("utf-8", errors="replace")
    out: list[str] = []
    if route == "/vertex" and status == 500 and text == VERTEX_INCOMPLETE:
        pass  # TGI's contract: any failed instance, a client's invalid one included, fails /vertex so
    elif status >= 500:
        out.append(f"{status}: {text[:300]}")
    elif status == 424:  # the request passed validation, then the engine failed on it
        out.append(f"the engine failed on this request (424): {text[:300]}")
    elif status == 401:
        if body:
            out.append(f"401 with a body: {text[:100]}")
    elif status >= 400:
        if content_type.startswith("application/json"):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if not _error_shape(parsed):
                out.append(f"{status} body is not TGI's error shape: {text[:300]}")
        elif not (status in BODY_REJECTIONS and text.startswith(BODY_REJECTIONS[status])):
            out.append(f"{status} with an unexpected {content_type or 'untyped'} body: {text[:300]}")
    elif status == 200 and content_type.startswith("text/event-stream"):
        out += _stream_violations(text, sent)
    elif status == 200:
        try:
            json.loads(text)
        except ValueError:
            out.append(f"200 body is not JSON: {text[:200]}")
    if status >= 400 and (found := leaks(text, sent)):
        out.append(f"{status} leaks {found}: {text[:300]}")
    return out
