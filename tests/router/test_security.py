"""What the router lets in, and what its errors let out: the API key on exactly TGI's protected routes, CORS per
TGI's flags, body and header limits (over HTTP, on a live uvicorn, where chunked uploads and oversized headers are
real), and no file system path or stack trace in any error a client sees."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from loom.router.app import create_app
from loom.router.config import RouterConfig

GEN = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}


@pytest.fixture()
def live_router(engine_server, llama_dir):
    """Start a router on a free port under uvicorn, in a thread (the only router connected to the engine while it
    runs); returns its port."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides) -> int:
        config = RouterConfig(model_id="loom-test/tiny-llama", model_dir=str(llama_dir), **overrides)
        app = create_app(config, engine_server.endpoint, connect_timeout=30)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the router did not start"
            time.sleep(0.05)
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
    engine_server.engine.check_integrity()


def exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes the connection or `timeout` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return _read_all(s)


def _read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


# ---------------------------------------------------------------------------------------------------------------
# Body and header limits


def test_chunked_body_is_cut_off_at_the_payload_limit(live_router):
    """Without a Content-Length the body used to be read whole before its size was checked: an endless chunked
    upload was buffered without bound. Now the 413 comes once the limit is crossed, while the client still sends."""
    port = live_router(payload_limit=100_000)
    head = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunk = b"a" * 32_768
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b'11\r\n{"inputs": "xxxxx\r\n')
        for _ in range(4):  # past the limit; the last chunk (0) never comes
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        response = _read_all(s)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert response.endswith(b"Failed to buffer the request body: length limit exceeded")


def test_declared_and_chunked_bodies_under_and_over_the_limit(make_client):
    c = make_client(payload_limit=2_000)
    body = b'{"inputs": "' + b"a" * 3_000 + b'"}'
    for content in (body, iter([body[:1_000], body[1_000:]])):  # Content-Length, then chunked
        r = c.post("/generate", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.text == "Failed to buffer the request body: length limit exceeded"
    small = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 1}}'
    r = c.post("/generate", content=iter([small[:10], small[10:]]), headers={"content-type": "application/json"})
    assert r.status_code == 200


@pytest.mark.parametrize("head", [
    b"X-Big: " + b"a" * 1_000_000 + b"\r\n",  # one huge header
    b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(5_000)),  # many headers, 1 MB in all
    b"X-Big: " + b"a" * 60_000 + b"\r\n",
    b"".join(b"X-H%d: v\r\n" % i for i in range(2_000)),
], ids=["1MB-header", "5000-headers-1MB", "60kB-header", "2000-headers"])
def test_large_and_many_headers_are_refused_or_served_not_failed(live_router, head):
    port = live_router()
    response = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + head + b"Connection: close\r\n\r\n")
    status = int(response.split(b" ", 2)[1])
    assert status == 200 or 400 <= status < 500, response[:200]
    assert exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200")  # and the server goes on
