"""Fuzzing Loom's HTTP API from its own OpenAPI document (hypothesis + hypothesis-jsonschema), shared by
tests/router/test_fuzz.py (in-process, a fast slice) and scripts/fuzz.py (a live server, the long run).

Each case is one POST to a route of the document: a body generated from the route's request schema, then either
sent as is ("valid"), with one value replaced by a hostile one ("mutated": wrong types, huge ints, NaN/Infinity,
unicode edge cases, empty and enormous strings), with a field aimed at a known-risky feature ("targeted": deeply
nested and invalid grammars, invalid regexes, tool definitions of odd shapes, stop lists at and over the limit), or
replaced by malformed bytes ("raw"); the values come from loom.testing.fuzz_values. Every generation is bounded to
`max_new_tokens` <= 2 where the body allows it, so a case costs milliseconds. `findings` are the requests that once
broke the server, replayed first by every run; `violations` (loom.testing.fuzz_checks) is what each response must
satisfy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from loom.testing.fuzz_checks import leaks, violations
from loom.testing.fuzz_values import (
    FuzzLimits,
    choice,
    either,
    grammars,
    hostile_value,
    malformed_bodies,
    risky_numbers,
    stop_lists,
    tool_choices,
    tools,
    unicode_text,
)

__all__ = ["FuzzCase", "FuzzLimits", "cases", "findings", "leaks", "post_routes", "violations"]

# ---------------------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class FuzzCase:
    path: str
    body: bytes
    content_type: str | None = "application/json"  # None: no Content-Type header
    kind: str = "valid"  # valid | mutated | targeted | raw | finding (a past finding, replayed)

    def describe(self) -> str:
        head = self.body[:300].decode("utf-8", errors="backslashreplace")
        more = f"... ({len(self.body)} bytes)" if len(self.body) > 300 else ""
        return f"POST {self.path} [{self.kind}, content-type {self.content_type}] {head}{more}"


def post_routes(doc: dict) -> dict[str, dict]:
    """path → JSON schema of the request body, for every POST route of an OpenAPI document."""
    routes = {}
    for path, ops in doc["paths"].items():
        op = ops.get("post")
        if op is not None:
            routes[path] = op["requestBody"]["content"]["application/json"]["schema"]
    return routes


def tighten(schema: Any) -> Any:
    """The schema with objects closed (no invented keys: mutations add those) and arrays and strings kept small,
    and untyped values ("any JSON") narrowed to scalars, so that generation is fast and lands on declared fields."""
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k not in ("discriminator", "description", "title")}
    for key in ("anyOf", "oneOf", "allOf"):
        if key in out:
            out[key] = [tighten(s) for s in out[key]]
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = tighten(out[key])
    if "properties" in out:
        out["properties"] = {name: tighten(s) for name, s in out["properties"].items()}
    if not (set(out) & {"type", "anyOf", "oneOf", "allOf", "$ref", "const", "enum"}):
        out["type"] = ["null", "boolean", "integer", "string"]
    if out.get("type") == "object" and "additionalProperties" not in out and "properties" in out:
        out["additionalProperties"] = False
    if out.get("type") == "array":
        out.setdefault("maxItems", 3)
    if out.get("type") == "string":
        out.setdefault("maxLength", 24)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Shaping a generated body

_PATH = tuple[Any, ...]


def _paths(value: Any, prefix: _PATH = ()) -> list[_PATH]:
    """Every location in a JSON value (the root included), parents before children."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _replace(value: Any, path: _PATH, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)
    return copy


def _request_dicts(value: Any) -> list[dict]:
    """The generation requests inside a body (the body itself, or vertex instances)."""
    found = []
    if isinstance(value, dict):
        if {"inputs", "messages", "prompt"} & set(value):
            found.append(value)
        for v in value.values():
            found += _request_dicts(v)
    elif isinstance(value, list):
        for v in value:
            found += _request_dicts(v)
    return found


def _small(value: Any) -> bool:
    """Whether a max-tokens value is an int that would be accepted and run long (hostile values are kept)."""
    return isinstance(value, int) and not isinstance(value, bool) and 2 < value < 10**6


def usable(body: Any) -> Any:
    """Give chat messages that have neither `content` nor `tool_calls` a content (in place): the schema cannot say
    that one of the two is needed, and most generated conversations would fail on it before reaching anything."""
    for req in _request_dicts(body):
        for message in req.get("messages") or []:
            if isinstance(message, dict) and message.get("content") is None and message.get("tool_calls") is None:
                message["content"] = "Hello"
    return body


def bound_generation(body: Any, draw) -> Any:
    """Cap every generation the body asks for at <= 2 new tokens (in place), where the field is usable."""
    for req in _request_dicts(body):
        if "inputs" in req:
            params = req.get("parameters")
            if params is None:
                req["parameters"] = params = {}
            if isinstance(params, dict) and (params.get("max_new_tokens") is None or _small(params["max_new_tokens"])):
                params["max_new_tokens"] = draw(st.integers(1, 2))
        else:
            for key in ("max_tokens", "max_completion_tokens"):
                if _small(req.get(key)):
                    req[key] = draw(st.integers(1, 2))
            if req.get("max_tokens") is None and req.get("max_completion_tokens") is None:
                req["max_tokens"] = draw(st.integers(1, 2))
    return body


NATIVE_NUMBERS = ["temperature", "repetition_penalty", "frequency_penalty", "top_k", "top_p", "typical_p", "truncate",
                  "best_of", "top_n_tokens", "seed", "max_new_tokens"]
CHAT_NUMBERS = ["temperature", "top_p", "presence_penalty", "frequency_penalty", "top_logprobs", "seed", "n",
                "max_tokens"]


def _target(req: dict, draw, limits: FuzzLimits) -> None:
    """Set one risky field of a generation request (in place), sometimes asking for logprobs too."""
    if "inputs" in req:
        params = req.get("parameters")
        if not isinstance(params, dict):
            req["parameters"] = params = {}
        field = draw(choice(["grammar", "grammar", "stop", *NATIVE_NUMBERS]))
        special = {"grammar": grammars(limits), "stop": stop_lists(limits)}
        params[field] = draw(special.get(field, risky_numbers(limits)))
        if draw(st.booleans()):
            params.update(details=True, top_n_tokens=draw(choice([None, 1, 5])), do_sample=draw(st.booleans()))
        return
    if "messages" in req:
        field = draw(choice(["response_format", "tools", "tools", "stop", "messages", *CHAT_NUMBERS]))
        if field == "tools":
            req["tools"] = draw(tools(limits))
            if draw(st.booleans()):
                req["tool_choice"] = draw(tool_choices(limits))
            if draw(st.booleans()):
                req["tool_prompt"] = draw(either(st.none(), unicode_text()))
        elif field == "messages":
            req["messages"] = draw(either(
                st.just([]), st.just([{"role": "assistant", "content": ""}]),
                st.lists(st.fixed_dictionaries({"role": choice(["user", "assistant", "system", "tool", ""]),
                                                "content": either(unicode_text(), st.just([]))}), max_size=3),
                st.just([{"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {
                    "name": "f", "arguments": {"a": [1, {"b": None}]}}}]}, {"role": "user", "content": "hi"}]),
            ))
        elif field in CHAT_NUMBERS:
            req[field] = draw(risky_numbers(limits))
        else:
            req[field] = draw(grammars(limits) if field == "response_format" else stop_lists(limits))
        if draw(st.booleans()):
            req.update(logprobs=True, top_logprobs=draw(choice([None, 1, 5])))
        return
    if "prompt" in req:
        n = limits.max_client_batch_size
        field = draw(choice(["prompt", "temperature", "top_p", "repetition_penalty", "frequency_penalty",
                             "seed", "max_tokens", "stop"]))
        if field == "prompt":
            req["prompt"] = draw(either(st.lists(unicode_text(), min_size=n, max_size=n + 1), st.just([]),
                                        st.just([""]), stop_lists(limits)))
        else:
            req[field] = draw(stop_lists(limits) if field == "stop" else risky_numbers(limits))


def _mutate(body: Any, draw, limits: FuzzLimits) -> Any:
    """Replace one value by a hostile one, or add an unknown key to an object, or drop a key."""
    paths = _paths(body)
    rnd = draw(st.randoms(use_true_random=False))  # uniform: sampled_from favours the first (shallowest) paths
    if len(paths) > 1 and rnd.random() < 0.9:
        paths = paths[1:]  # the whole body replaced: one case in ten
    where = rnd.choice(paths)
    op = draw(choice(["replace", "replace", "replace", "add", "drop"]))
    node = body
    for key in where:
        node = node[key]
    if op == "add" and isinstance(node, dict):
        return _replace(body, where, {**node, "unknown_\ud800": draw(hostile_value(limits))})
    if op == "drop" and where and isinstance(where[-1], str):
        parent = body
        for key in where[:-1]:
            parent = parent[key]
        return _replace(body, where[:-1], {k: v for k, v in parent.items() if k != where[-1]})
    return _replace(body, where, draw(hostile_value(limits)))


def encode(body: Any, ascii_only: bool) -> bytes:
    """JSON with NaN/Infinity spelled out; lone surrogates as escapes, or as their raw (invalid UTF-8) bytes."""
    text = json.dumps(body, allow_nan=True, ensure_ascii=ascii_only)
    return text.encode("utf-8", errors="surrogatepass")


def _union(schema: dict) -> list[dict] | None:
    """The branches of a union of objects."""
    branches = schema.get("anyOf") or schema.get("oneOf")
    return branches if branches and all(b.get("type") == "object" for b in branches) else None


def _has_union(schema: dict) -> bool:
    if _union(schema):
        return True
    if schema.get("type") == "array":
        return isinstance(schema.get("items"), dict) and _has_union(schema["items"])
    return schema.get("type") == "object" and any(_has_union(p) for p in schema.get("properties", {}).values())


def _schema_strategy(schema: dict) -> st.SearchStrategy[Any]:
    """`from_schema`, with unions of objects (and the objects and arrays holding them) taken apart first:
    hypothesis-jsonschema is slow on such unions (SageMaker's and Vertex's request bodies)."""
    if not _has_union(schema):
        return from_schema(schema)
    if branches := _union(schema):
        return either(*(_schema_strategy(b) for b in branches))
    if schema.get("type") == "array":
        return st.lists(_schema_strategy(schema["items"]), max_size=schema.get("maxItems", 3))
    required = set(schema.get("required", []))
    props = {name: _schema_strategy(p) for name, p in schema.get("properties", {}).items()}
    return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                 optional={k: v for k, v in props.items() if k not in required})


def cases(path: str, schema: dict, limits: FuzzLimits = FuzzLimits()) -> st.SearchStrategy[FuzzCase]:
    """Requests to `path`, built from its request `schema` (the strategies are built once: hypothesis-jsonschema's
    canonicalisation is the expensive part)."""
    bodies = _schema_strategy(tighten(schema))
    raw = malformed_bodies(limits)

    @st.composite
    def case(draw) -> FuzzCase:
        kind = draw(choice(["valid", "mutated", "mutated", "targeted", "targeted", "raw"]))
        if kind == "raw":
            body, content_type = draw(raw)
            return FuzzCase(path, body, content_type, kind)
        body = usable(draw(bodies))
        if kind == "targeted" and (reqs := _request_dicts(body)):
            _target(draw(choice(range(len(reqs))).map(reqs.__getitem__)), draw, limits)
        elif kind != "valid":
            kind = "mutated"
            body = _mutate(body, draw, limits)
        body = bound_generation(body, draw)
        return FuzzCase(path, encode(body, ascii_only=draw(st.booleans())), "application/json", kind)

    return case()


# Requests that once broke the server (each fixed in its own commit, with a regression test), by request family;
# every run replays them first.
_NATIVE_FINDINGS: list[bytes] = [
    b'{"inputs": "a", "parameters": {"max_new_tokens": 1, "temperature": NaN}}',
    b'{"inputs": "a", "parameters": {"max_new_tokens": 1, "stop": ["\\ud800"]}}',
    b'{"inputs": "a", "parameters": {"max_new_tokens": 1, "stop": ["\xed\xa0\x80"]}}',
    b'{"inputs": "a", "parameters": {"max_new_tokens": 1, "top_k": 1000000000000000000000000000000}}',
    b'{"inputs": "a", "parameters": {"max_new_tokens": 2, "temperature": 1e-38, "details": true, "top_n_tokens": 2}}',
    b'{"inputs": "a", "parameters": ' * 3000 + b"{}" + b"}" * 3000,
]
_CHAT_FINDINGS: list[bytes] = [
    b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "temperature": Infinity}',
    b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "tools": [{"type": "function", '
    b'"function": {"name": "f", "parameters": "not json"}}]}',
    b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "tools": [{"type": "function", '
    b'"function": {"name": "f", "parameters": {"properties": [1], "required": 5}}}]}',
    b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "tools": [{"type": "function", '
    b'"function": {"name": "f", "parameters": {}}}], "tool_choice": {"function": "f"}}',
    b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "temperature": 1e-38, "logprobs": true, '
    b'"top_logprobs": 2}',
    b'{"messages": [], "max_tokens": 1, "tools": [{"type": "function", "function": {"name": "f", "arguments": ""}}]}',
]
_COMPLETION_FINDINGS: list[bytes] = [
    b'{"prompt": "a", "max_tokens": 1, "temperature": NaN}',
    b'{"prompt": ["a", "\\udfff"], "max_tokens": 1}',
]


def findings(schema: dict) -> list[bytes]:
    """The past findings that fit a route's request schema (all three families for SageMaker's union)."""
    if "instances" in schema.get("properties", {}):  # Vertex: each finding as an instance
        instance = schema["properties"]["instances"].get("items", {})
        return [b'{"instances": [' + body + b"]}" for body in findings(instance)]
    shapes = schema.get("anyOf") or schema.get("oneOf") or [schema]
    out: list[bytes] = []
    for shape in shapes:
        props = shape.get("properties", {})
        out += _NATIVE_FINDINGS if "inputs" in props else _CHAT_FINDINGS if "messages" in props else \
            _COMPLETION_FINDINGS if "prompt" in props else []
    return out
