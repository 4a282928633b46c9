"""Golden snapshots of every route's response on the wire (status, headers, body bytes), as TGI keeps syrupy
snapshots of its responses: a refactor of the router cannot change the wire format unnoticed.

One JSON file per case in tests/router/snapshots/. A missing snapshot is written and the test fails ("snapshot
written, re-run"); with LOOM_UPDATE_SNAPSHOTS=1 every snapshot is rewritten and the tests pass.

What is compared:
- status; the response headers in the order sent (minus content-length, checked against the body instead), with
  the timing headers replaced by their format (`<seconds>` float string, `<ms>` integer string);
- JSON bodies as received (key order included, compared list by list) plus whether the bytes are compact JSON;
- SSE bodies as a framing skeleton (one entry per event block: `data:<json>` for a compact JSON payload,
  `data: [DONE]`, keep-alive `:` comments, anything else verbatim) plus the parsed JSON events;
- text bodies verbatim; /metrics as the set of metric names only.
Run-to-run values are replaced by placeholders: `created` (checked to be the current unix time), the package
version in `version` / `system_fingerprint`, UUIDs. Floats (logprobs) compare with a small tolerance so an engine
numerics change is not a wire-format change; their JSON type (float vs int vs null) must still match.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loom import __version__
from loom.router.app import create_app
from loom.router.config import RouterConfig

SNAPSHOT_DIR = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("LOOM_UPDATE_SNAPSHOTS") == "1"
FLOAT_REL_TOL, FLOAT_ABS_TOL = 1e-3, 1e-5

HELLO = [{"role": "user", "content": "Hello"}]
WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 12},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location", "format"]}}}
WEATHER_Q = [{"role": "user", "content": "What is the weather like in Brooklyn?"}]


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    json: Any = None  # a JSON request body
    content: str | None = None  # a raw request body (sent with `headers`)
    headers: dict[str, str] = field(default_factory=dict)
    router: dict[str, Any] | None = None  # RouterConfig overrides: the case gets a fresh router (make_client)
    metric_names: bool = False  # snapshot only the metric names of the body


def get(path: str, **kw) -> Case:
    return Case("GET", path, **kw)


def post(path: str, body: Any = None, **kw) -> Case:
    return Case("POST", path, json=body, **kw)


def gen(**params) -> dict:
    return {"inputs": "Hello world", "parameters": {"max_new_tokens": 5, **params}}


def chat(**body) -> dict:
    return {"messages": HELLO, "max_tokens": 5, "temperature": 0, **body}


CASES: dict[str, Case] = {
    # health / info
    "get_health": get("/health"),
    "get_ping": get("/ping"),
    "get_root": get("/"),
    "get_info": get("/info"),
    "get_v1_models": get("/v1/models"),
    "get_metrics_names": get("/metrics", router={}, metric_names=True),
    # /generate
    "generate_plain": post("/generate", gen()),
    "generate_details": post("/generate", gen(details=True)),
    "generate_decoder_input_details": post("/generate", gen(decoder_input_details=True)),
    "generate_prefill_logprobs": post("/generate", gen(decoder_input_details=True),
                                      router={"enable_prefill_logprobs": True}),
    "generate_top_n_tokens": post("/generate", gen(details=True, top_n_tokens=2)),
    "generate_seed_do_sample": post("/generate", gen(details=True, do_sample=True, seed=42)),
    "generate_return_full_text": post("/generate", gen(return_full_text=True)),
    # POST / (compat)
    "compat_generate": post("/", gen()),
    "compat_generate_details": post("/", gen(details=True)),
    "compat_generate_stream": post("/", {**gen(details=True), "stream": True}),
    # /generate_stream
    "generate_stream": post("/generate_stream", gen()),
    "generate_stream_details_top_n": post("/generate_stream", gen(details=True, top_n_tokens=2)),
    "generate_stream_seed_do_sample": post("/generate_stream", gen(details=True, do_sample=True, seed=42)),
    # /v1/completions
    "completions": post("/v1/completions", {"prompt": "Hello world", "max_tokens": 5, "temperature": 0}),
    "completions_stream": post("/v1/completions", {"prompt": "Hello world", "max_tokens": 5, "temperature": 0,
                                                   "stream": True}),
    # /v1/chat/completions
    "chat": post("/v1/chat/completions", chat()),
    "chat_model_echo": post("/v1/chat/completions", chat(model="tgi")),
    "chat_seed_sampling": post("/v1/chat/completions", {"messages": HELLO, "max_tokens": 5, "seed": 42}),
    "chat_logprobs": post("/v1/chat/completions", chat(logprobs=True, top_logprobs=2)),
    "chat_stream": post("/v1/chat/completions", chat(stream=True)),
    "chat_stream_include_usage": post("/v1/chat/completions",
                                      chat(stream=True, stream_options={"include_usage": True})),
    "chat_stream_logprobs": post("/v1/chat/completions", chat(stream=True, logprobs=True, top_logprobs=2)),
    "chat_tools": post("/v1/chat/completions", chat(messages=WEATHER_Q, tools=[WEATHER], tool_choice="required",
                                                    max_tokens=120)),
    "chat_tools_stream": post("/v1/chat/completions", chat(messages=WEATHER_Q, tools=[WEATHER],
                                                           tool_choice="required", max_tokens=120, stream=True)),
    "chat_tool_choice_none": post("/v1/chat/completions", chat(tools=[WEATHER], tool_choice="none")),
    # tokenize
    "tokenize": post("/tokenize", {"inputs": "Hello world, héllo"}),
    "tokenize_truncate": post("/tokenize", {"inputs": "Hello world, héllo", "parameters": {"truncate": 2}}),
    "chat_tokenize": post("/chat_tokenize", {"messages": HELLO}),
    # /invocations (SageMaker)
    "invocations_generate": post("/invocations", gen()),
    "invocations_chat": post("/invocations", chat()),
    "invocations_completions": post("/invocations", {"prompt": "Hello world", "max_tokens": 5, "temperature": 0}),
    # /vertex (Google Vertex AI)
    "vertex": post("/vertex", {"instances": [{"inputs": "Hello world", "parameters": {"max_new_tokens": 5, "seed": 42}},
                                             chat()]}),
    # errors
    "error_generate_temperature_zero": post("/generate", gen(temperature=0)),
    "error_generate_temperature_negative": post("/generate", gen(temperature=-1)),
    "error_generate_empty_inputs": post("/generate", {"inputs": "", "parameters": {"max_new_tokens": 5}}),
    "error_generate_top_n_tokens": post("/generate", gen(top_n_tokens=6)),
    "error_generate_missing_inputs": post("/generate", {"parameters": {}}),
    "error_generate_bad_json": Case("POST", "/generate", content="{not json",
                                    headers={"content-type": "application/json"}),
    "error_generate_content_type": Case("POST", "/generate", content='{"inputs": "x"}',
                                        headers={"content-type": "text/plain"}),
    "error_generate_stream_validation": post("/generate_stream", gen(temperature=-1)),
    "error_generate_stream_decoder_input_details": post("/generate_stream", gen(decoder_input_details=True)),
    "error_tokenize_empty": post("/tokenize", {"inputs": ""}),
    "error_chat_validation": post("/v1/chat/completions", chat(temperature=-1)),
    "error_chat_stream_validation": post("/v1/chat/completions", chat(temperature=-1, stream=True)),
    "error_chat_tool_not_found": post("/v1/chat/completions", chat(tools=[WEATHER], tool_choice="nope")),
    "error_chat_tools_and_grammar": post("/v1/chat/completions", chat(
        tools=[WEATHER], response_format={"type": "json", "value": {"properties": {"a": {"type": "string"}}}})),
    "error_completions_suffix": post("/v1/completions", {"prompt": "Hi", "suffix": "end"}),
    "error_completions_batch_size": post("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"]}),
    "error_completions_empty_prompt_list": post("/v1/completions", {"prompt": []}),
    "error_invocations_unknown_shape": post("/invocations", {"nothing": 1}),
    "error_vertex_no_instances": post("/vertex", {"instances": []}),
    "error_vertex_instance_failed": post("/vertex", {"instances": [{"inputs": "", "parameters": {
        "max_new_tokens": 5}}]}),
    "error_not_found": get("/no/such/route"),
    "error_method_not_allowed": get("/generate"),
    "error_overloaded_generate": post("/generate", gen(), router={"max_concurrent_requests": 0}),
    "error_overloaded_generate_stream": post("/generate_stream", gen(), router={"max_concurrent_requests": 0}),
    "error_overloaded_chat_stream": post("/v1/chat/completions", chat(stream=True),
                                         router={"max_concurrent_requests": 0}),
}

# ---------------------------------------------------------------------------------------------------------------
# Fixtures. The engine is conftest's session `engine_server`. Only one router may be connected to it at a time (its
# output socket is a PUSH: two routers would each get a share of the other's tokens), so the cases on the default
# router share one module-long router, built as `make_client` builds its routers, and the cases that need other
# router flags run last, each on its own `make_client` router after the shared one is closed.


class SharedRouter:
    def __init__(self, engine_server, llama_dir):
        self.engine_server, self.llama_dir = engine_server, llama_dir
        self.client: TestClient | None = None

    def get(self) -> TestClient:
        if self.client is None:
            config = RouterConfig(model_id="loom-test/tiny-llama", model_dir=str(self.llama_dir))
            self.client = TestClient(create_app(config, self.engine_server.endpoint, connect_timeout=30))
            self.client.__enter__()
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.__exit__(None, None, None)
            self.client = None
            self.engine_server.engine.check_integrity()


@pytest.fixture(scope="module")
def shared_router(engine_server, llama_dir):
    router = SharedRouter(engine_server, llama_dir)
    yield router
    router.close()


@pytest.fixture(autouse=True)
def _default_compute_type(monkeypatch):
    monkeypatch.delenv("COMPUTE_TYPE", raising=False)  # x-compute-type is part of the snapshots


# ---------------------------------------------------------------------------------------------------------------
# Normalization

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
SECONDS_HEADERS = {"x-compute-time"}
MS_HEADERS = {"x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"}


def compact(obj: Any) -> str:
    """The server's JSON encoding (Starlette's JSONResponse and loom.router.streams.compact)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Normalizer:
    def __init__(self, started: float, ended: float):
        self.window = (int(started) - 1, int(ended) + 1)
        self.problems: list[str] = []  # varying values that did not look as expected: shown in the snapshot

    def value(self, obj: Any, key: str | None = None) -> Any:
        if isinstance(obj, dict):
            return {k: self.value(v, k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        if key == "created" and isinstance(obj, int) and not isinstance(obj, bool) and obj != 0:
            if not self.window[0] <= obj <= self.window[1]:
                self.problems.append(f"`created` {obj} is not the current unix time {self.window}")
            return "<unix-time>"
        if key in ("version", "system_fingerprint") and isinstance(obj, str) and __version__ in obj:
            return obj.replace(__version__, "<version>")
        if isinstance(obj, str) and UUID_RE.search(obj):
            return UUID_RE.sub("<uuid>", obj)
        return obj

    def header(self, name: str, value: str) -> str:
        if name in SECONDS_HEADERS:
            if not re.fullmatch(r"\d+(\.\d+)?(e-?\d+)?", value):
                self.problems.append(f"header {name}: {value!r} is not a float string")
            return "<seconds>"
        if name in MS_HEADERS:
            if not re.fullmatch(r"\d+", value):
                self.problems.append(f"header {name}: {value!r} is not an integer string")
            return "<ms>"
        return value


def sse_snapshot(text: str, norm: Normalizer) -> dict:
    """The framing skeleton (one entry per event block) and the parsed JSON events."""
    framing: list[str] = []
    events: list[Any] = []
    blocks = text.split("\n\n")
    tail = blocks.pop()  # "" when the body ends with a blank line, as every event must
    for block in blocks:
        lines = []
        for line in block.split("\n"):
            if line.startswith("data:") and line[5:] not in ("[DONE]", " [DONE]"):
                payload = line[5:]
                try:
                    parsed = json.loads(payload)
                except ValueError:
                    lines.append(line)
                    continue
                events.append(norm.value(parsed))
                lines.append("data:<json>" if compact(parsed) == payload else "data:<json, not compact>")
            else:
                lines.append(line)  # data:[DONE] / data: [DONE], keep-alive comments, anything unexpected
        framing.append("\n".join(lines))
    if tail:
        framing.append(f"<unterminated: {tail!r}>")
    return {"framing": framing, "events": events}


def metric_names(text: str) -> dict:
    families = {}
    samples = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families[name] = kind
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return {"families": dict(sorted(families.items())), "samples": sorted(samples)}


def response_snapshot(case: Case, r, norm: Normalizer) -> dict:
    raw = r.content
    headers = []
    for name_b, value_b in r.headers.raw:
        name, value = name_b.decode("latin-1"), value_b.decode("latin-1")
        if name.lower() == "content-length":
            if value != str(len(raw)):
                norm.problems.append(f"content-length {value} != body length {len(raw)}")
            continue
        headers.append(f"{name}: {norm.header(name.lower(), value)}")
    out: dict[str, Any] = {"status": r.status_code, "headers": headers}
    content_type = r.headers.get("content-type", "")
    text = raw.decode("utf-8")
    if case.metric_names:
        out["body_format"] = "prometheus text (metric names only)"
        out["body"] = metric_names(text)
    elif content_type.startswith("text/event-stream"):
        out["body_format"] = "sse"
        out.update(sse_snapshot(text, norm))
    elif content_type.startswith("application/json"):
        parsed = json.loads(text)
        out["body_format"] = "compact json" if compact(parsed) == text else "json (not compact)"
        out["body"] = norm.value(parsed)
    else:
        out["body_format"] = "empty" if not raw else "text"
        out["body"] = text
    if norm.problems:
        out["normalization_problems"] = norm.problems
    return out


def request_snapshot(case: Case) -> dict:
    req: dict[str, Any] = {"method": case.method, "path": case.path}
    if case.router is not None:
        req["router_overrides"] = case.router
    if case.headers:
        req["headers"] = case.headers
    if case.json is not None:
        req["json"] = case.json
    if case.content is not None:
        req["content"] = case.content
    return req


# ---------------------------------------------------------------------------------------------------------------
# Comparison


def mismatch(expected: Any, actual: Any, path: str = "$") -> str | None:
    """The first difference (None if equal): dict key order counts; floats compare with a tolerance but must stay
    floats."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if list(expected) != list(actual):
            return f"{path}: keys {list(expected)} != {list(actual)}"
        for k in expected:
            if (m := mismatch(expected[k], actual[k], f"{path}.{k}")) is not None:
                return m
        return None
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return f"{path}: {len(expected)} items != {len(actual)} items"
        for i, (e, a) in enumerate(zip(expected, actual)):
            if (m := mismatch(e, a, f"{path}[{i}]")) is not None:
                return m
        return None
    if isinstance(expected, float) and isinstance(actual, float):
        if math.isclose(expected, actual, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL):
            return None
        return f"{path}: {expected!r} != {actual!r}"
    if type(expected) is not type(actual) or expected != actual:
        return f"{path}: {expected!r} != {actual!r}"
    return None


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def check_snapshot(name: str, snapshot: dict) -> None:
    path = SNAPSHOT_DIR / f"{name}.json"
    if UPDATE or not path.exists():
        SNAPSHOT_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(dump(snapshot), encoding="utf-8")
        assert json.loads(path.read_text(encoding="utf-8")) == snapshot, f"could not write {path}"
        if not UPDATE:
            pytest.fail(f"snapshot written, re-run: {path}", pytrace=False)
        return
    expected = json.loads(path.read_text(encoding="utf-8"))
    if (m := mismatch(expected, snapshot)) is not None:
        diff = "".join(difflib.unified_diff(
            dump(expected).splitlines(keepends=True), dump(snapshot).splitlines(keepends=True),
            fromfile=f"snapshots/{name}.json", tofile="actual"))
        pytest.fail(f"{name} differs from its snapshot (LOOM_UPDATE_SNAPSHOTS=1 to accept)\n"
                    f"first difference: {m}\n{diff}", pytrace=False)


# ---------------------------------------------------------------------------------------------------------------
# Tests


def run_case(name: str, client: TestClient) -> None:
    case = CASES[name]
    kwargs: dict[str, Any] = {"headers": case.headers}
    if case.json is not None:
        kwargs["json"] = case.json
    if case.content is not None:
        kwargs["content"] = case.content.encode()
    if case.metric_names:  # a fresh router: one known request first, so the series present are fixed
        assert client.post("/generate", json=gen()).status_code == 200
    started = time.time()
    r = client.request(case.method, case.path, **kwargs)
    norm = Normalizer(started, time.time())
    check_snapshot(name, {"request": request_snapshot(case), "response": response_snapshot(case, r, norm)})


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.router is None])
def test_snapshot(name, shared_router):
    run_case(name, shared_router.get())


def served_routes(routes) -> list:
    """The app's routes, through FastAPI's included-router wrappers (create_app includes routers without prefix)."""
    out = []
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI >= 0.165 keeps included routers wrapped
        out.extend(served_routes(included.routes) if included is not None else [route])
    return out


def test_snapshot_route_table(shared_router):
    """Every route the app serves and every path its OpenAPI document lists (a new or removed route shows here,
    and should get a case above)."""
    app = shared_router.get().app
    routes = sorted(f"{m} {r.path}" for r in served_routes(app.routes) for m in getattr(r, "methods", None) or ())
    documented = sorted(f"{m.upper()} {path}" for path, ops in app.openapi()["paths"].items() for m in ops)
    check_snapshot("route_table", {"routes": routes, "openapi_paths": documented})
    uncovered = set(documented) - {f"{c.method} {c.path}" for c in CASES.values()}
    assert not uncovered, f"routes without a snapshot case: {sorted(uncovered)}"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.router is not None])
def test_snapshot_own_router(name, shared_router, make_client):
    shared_router.close()
    run_case(name, make_client(**CASES[name].router))


def test_no_stale_snapshots():
    expected = {f"{n}.json" for n in CASES} | {"route_table.json"}
    stale = sorted(p.name for p in SNAPSHOT_DIR.glob("*.json") if p.name not in expected)
    assert not stale, f"snapshot files without a case: {stale}"
