"""What the router lets in, and what its errors let out: the API key on exactly TGI's protected routes, CORS per
TGI's flags, body and header limits (over HTTP, on a live uvicorn, where chunked uploads and oversized headers are
real), and no file system path or stack trace in any error a client sees."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from loom.router.app import PROTECTED_PATHS, create_app
from loom.router.config import RouterConfig
from loom.testing.fuzz_checks import leaks

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


# ---------------------------------------------------------------------------------------------------------------
# No paths or stack traces in what clients see


def _inject_sampler_fault(monkeypatch, error: BaseException) -> None:
    """typical_p's warper raises `error`: only the request that asks for typical_p fails (its own 424)."""
    from loom.worker import sampler as sampler_module  # noqa: PLC0415 — the test reaches into the engine on purpose
    from loom.worker.sampler import _Warper  # noqa: PLC0415

    def fail(*_args) -> None:
        raise error

    warpers = list(sampler_module._WARPERS)
    warpers[3] = _Warper(warpers[3].value, fail)
    monkeypatch.setattr(sampler_module, "_WARPERS", tuple(warpers))


FAULTY = {"max_new_tokens": 2, "do_sample": True, "typical_p": 0.5}


def test_engine_failures_reach_clients_without_paths(client, monkeypatch):
    _inject_sampler_fault(monkeypatch, FileNotFoundError(2, "No such file or directory", "/work/secret/weights.bin"))
    r = client.post("/generate", json={"inputs": "Hi", "parameters": FAULTY})
    assert r.status_code == 424
    assert r.json() == {"error": "Request failed during generation: Server error: [Errno 2] No such file or "
                                 "directory: '<path>'", "error_type": "generation"}
    r = client.post("/generate_stream", json={"inputs": "Hi", "parameters": FAULTY})
    assert "<path>" in r.text and not leaks(r.text)


def test_a_failed_step_reaches_clients_without_its_trace(client, engine_server, monkeypatch):
    """A whole step that raises fails every request in it with the exception's text: its first line only, and no
    path (torch's errors carry C++ frames with library paths)."""
    step = engine_server.engine.step
    calls = []

    def failing_step():
        if not calls:
            calls.append(1)
            raise RuntimeError("index out of range in /work/loom/x.py\nException raised from check at "
                               "/pytorch/aten/src/ATen/native/Indexing.cpp:12 (most recent call first):\n"
                               "frame #0: c10::Error (0x7f in /usr/lib/site-packages/torch/lib/libc10.so)")
        return step()

    monkeypatch.setattr(engine_server.engine, "step", failing_step)
    r = client.post("/generate", json=GEN)
    assert r.status_code == 424
    assert r.json()["error"] == "Request failed during generation: Server error: index out of range in <path>"
    assert client.get("/health").status_code == 200  # the liveness probe after a failure passes


def test_error_responses_leak_nothing(make_client, tmp_path, llama_dir):
    """A handful of error-producing requests, each answered without a path or a trace."""
    c = make_client()
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    requests = [
        ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "(?<=a)b"}}}),
        ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": {
            "properties": {"a": {"$ref": "file:///etc/passwd"}}}}}}),
        ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": {
            "properties": {"a": {"type": "nonsense"}}}}}}),
        ("/generate", {"inputs": "", "parameters": {}}),
        ("/generate", {"inputs": "Hi", "parameters": {"temperature": "hot"}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tools": [tool],
                                  "tool_choice": "nope"}),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 1}),
        ("/vertex", {"instances": [{"inputs": ""}]}),
        ("/invocations", {"neither": 1}),
    ]
    for path, body in requests:
        r = c.post(path, json=body)
        assert 400 <= r.status_code < 600 and not leaks(r.text), (path, r.status_code, r.text)
    assert not leaks(c.post("/generate", content=b"{", headers={"content-type": "application/json"}).text)


def test_template_errors_leak_nothing(engine_server, llama_dir, tmp_path):
    """Templates that fail in every way jinja can (syntax, undefined, sandbox, loaders, Python errors)."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    templates = ["{% for m in messages %}{{ m.content }", "{{ foo() }}", "{{ raise_exception('/work/x.py') }}",
                 "{{ messages.__class__.__init__.__globals__ }}", "{% include '/etc/passwd' %}",
                 "{% import '" + str(Path(__file__)) + "' as x %}", "{{ 1 // 0 }}", "{{ strftime_now(1) }}"]
    for i, template in enumerate(templates):
        path = tmp_path / f"tokenizer_config_{i}.json"
        path.write_text(json.dumps({"chat_template": template}))
        router = RouterConfig(model_id="m", model_dir=str(model), tokenizer_config_path=str(path))
        with TestClient(create_app(router, engine_server.endpoint, connect_timeout=30)) as c:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 422 and r.json()["error_type"] == "template_error", r.text
            assert not leaks(r.text, sent=template.encode()), r.text


# ---------------------------------------------------------------------------------------------------------------
# API key


KEY = "s3cret-Key"
HELLO = [{"role": "user", "content": "Hi"}]
PROTECTED = {  # TGI's base routes (router/src/server.rs), with a body each accepts
    "/": GEN, "/generate": GEN, "/generate_stream": GEN, "/tokenize": {"inputs": "Hi"},
    "/v1/chat/completions": {"messages": HELLO, "max_tokens": 1}, "/v1/completions": {"prompt": "Hi", "max_tokens": 1},
    "/vertex": {"instances": [GEN]}, "/invocations": GEN,
}
OPEN = [("GET", "/health", None), ("GET", "/ping", None), ("GET", "/", None), ("GET", "/info", None),
        ("GET", "/metrics", None), ("GET", "/v1/models", None), ("GET", "/docs", None),
        ("GET", "/api-doc/openapi.json", None), ("POST", "/chat_tokenize", {"messages": HELLO})]


def test_api_key_guards_exactly_tgis_protected_routes(make_client):
    assert set(PROTECTED) == PROTECTED_PATHS
    c = make_client(api_key=KEY)
    for path, body in PROTECTED.items():
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            r = c.post(path, json=body, headers=headers)
            assert r.status_code == 401 and r.content == b"", (path, headers, r.status_code)
        r = c.post(path, json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "error" not in r.text, (path, r.text)
    for method, path, body in OPEN:
        assert c.request(method, path, json=body).status_code == 200, path
    # every method of a protected path, as TGI layers the whole route: no 405 that confirms the route to a stranger
    assert c.get("/generate").status_code == 401
    assert c.get("/generate", headers={"authorization": f"Bearer {KEY}"}).status_code == 405


@pytest.mark.parametrize("header, accepted", [
    (f"Bearer {KEY}", True), (f"bearer {KEY.lower()}", True), (f"BEARER {KEY.upper()}", True),
    (f"bEaReR {KEY.swapcase()}", True),  # TGI lowercases the whole header and "Bearer <key>"
    (KEY, False), ("Bearer", False), ("Bearer ", False), (f"Bearer  {KEY}", False), (f"Bearer\t{KEY}", False),
    (f"Basic {KEY}", False), (f"Token {KEY}", False), (f"Bearer {KEY[:-1]}", False), (f"Bearer {KEY}x", False),
    (f"Bearer {KEY}, Bearer other", False), (f"xBearer {KEY}", False), ("", False),
])
def test_bearer_header_variations(make_client, header, accepted):
    c = make_client(api_key=KEY)
    r = c.post("/generate", json=GEN, headers={"authorization": header})
    assert r.status_code == (200 if accepted else 401), r.text


def test_only_the_first_authorization_header_counts(make_client):
    c = make_client(api_key=KEY)
    r = c.post("/generate", json=GEN, headers=[("authorization", "Bearer wrong"), ("authorization", f"Bearer {KEY}")])
    assert r.status_code == 401
    r = c.post("/generate", json=GEN, headers=[("authorization", f"Bearer {KEY}"), ("authorization", "Bearer wrong")])
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# CORS (TGI: --cors-allow-origin, else any origin; methods GET and POST; the content-type header)


def preflight(c, origin: str, method: str = "POST", headers: str = "content-type"):
    return c.options("/generate", headers={"origin": origin, "access-control-request-method": method,
                                           "access-control-request-headers": headers})


def test_cors_default_allows_any_origin(make_client):
    c = make_client(api_key=KEY)
    r = preflight(c, "https://anywhere.example")  # a preflight needs no key: the browser sends none
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert {m.strip() for m in r.headers["access-control-allow-methods"].split(",")} == {"GET", "POST"}
    assert "content-type" in r.headers["access-control-allow-headers"].lower()
    r = c.post("/generate", json=GEN, headers={"origin": "https://anywhere.example",
                                               "authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    for method in ("PUT", "DELETE", "PATCH"):
        r = preflight(c, "https://anywhere.example", method=method)
        assert method not in r.headers.get("access-control-allow-methods", ""), method
    r = preflight(c, "https://anywhere.example", headers="authorization")
    assert "authorization" not in r.headers.get("access-control-allow-headers", "").lower()


def test_cors_allow_origin_list(make_client):
    c = make_client(cors_allow_origin=("https://a.example", "https://b.example"))
    for origin in ("https://a.example", "https://b.example"):
        r = preflight(c, origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = c.post("/generate", json=GEN, headers={"origin": origin})
        assert r.headers["access-control-allow-origin"] == origin and "origin" in r.headers["vary"].lower()
    for origin in ("https://evil.example", "https://a.example.evil", "null", "http://a.example"):
        assert "access-control-allow-origin" not in preflight(c, origin).headers, origin
        r = c.post("/generate", json=GEN, headers={"origin": origin})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers, origin


# ---------------------------------------------------------------------------------------------------------------
# Nothing fetched on a client's behalf (TGI bounds its image fetches with --max-image-fetch-size; Loom fetches none)


def test_urls_in_requests_are_never_fetched(client):
    import http.server  # noqa: PLC0415

    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 — the http.server API
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        image = {"type": "image_url", "image_url": {"url": f"{url}/cat.png"}}
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [image]}],
                                                      "max_tokens": 1})
        assert r.status_code == 200  # the URL is text in the prompt (`![](url)`), as TGI flattens it
        r = client.post("/generate", json={"inputs": f"![]({url}/dog.png) Hi", "parameters": {"max_new_tokens": 1}})
        assert r.status_code == 200
        grammar = {"type": "json", "value": {"properties": {"a": {"$ref": f"{url}/schema.json"}}}}
        r = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1, "grammar": grammar}})
        assert r.status_code == 422 and "does not fetch" in r.json()["error"]
    finally:
        server.shutdown()
    assert hits == []
