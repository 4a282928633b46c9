"""The hostile values and feature-aimed strategies of Loom's fuzzer (loom.testing.fuzz): unicode edge cases, huge
and non-finite numbers, enormous strings, deeply nested and invalid JSON schemas, invalid regexes, tool definitions
of odd shapes, stop lists at and over the limit, malformed bodies.

Choices are uniform (`choice`, `either`): hypothesis' own `sampled_from` / `one_of` favour their first options,
which suits shrinking, not a fuzzer that must reach every option within a few hundred examples.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

@dataclass(frozen=True)
class FuzzLimits:
    """The server's limits (from /info), so lists land at and just over them."""

    max_stop_sequences: int = 4
    max_client_batch_size: int = 4
    max_input_tokens: int = 511
    payload_limit: int = 2_000_000
    enormous: int = 50_000  # characters of an "enormous" string (tokenized: keep it cheap in the fast slice)
    max_depth: int = 40  # nesting of generated grammars

    @classmethod
    def from_info(cls, info: dict, **overrides: Any) -> FuzzLimits:
        return cls(max_stop_sequences=info["max_stop_sequences"],
                   max_client_batch_size=info["max_client_batch_size"],
                   max_input_tokens=info["max_input_tokens"], **overrides)


def choice(options: Sequence[Any]) -> st.SearchStrategy[Any]:
    """One of `options` (a fresh copy), uniformly: `sampled_from` favours the first ones, and a fuzzer must not."""
    return st.randoms(use_true_random=False).map(lambda r: copy.deepcopy(r.choice(options)))


def either(*strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value of one of `strategies`, chosen uniformly (unlike `one_of`)."""
    return choice(strategies).flatmap(lambda strategy: strategy)


# Values that break naive handlers. Lone surrogates reach the server as `\ud800` escapes (or, with
# ensure_ascii off, as invalid UTF-8 bytes).
UNICODE_EDGES = [
    "\ud800", "a\udfffb", "\x00", "a\x00b", "\u202eevil\u202c",
    "\u05e9\u05dc\u05d5\u05dd \u0627\u0644\u0633\u0644\u0627\u0645",
    "\U0001f600", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\ufeff", "\uffff", "\U0010ffff", "e\u0301",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\r\n\t", "\\", '"', "{{ raise_exception('x') }}", "{% if %}",
    " ", "\u3000\u00a0",
]
HUGE_INTS = [10**30, -(10**30), 2**31, 2**32, 2**53 + 1, 2**63, 2**64, -1, 0, -(2**63), 10**400]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 0.5, 1.0, 2.0]
REGEXES = [
    "(", ")", "[", "[z-a]", "a{2,1}", "(?P<x>", "\\", "*", "a**", "(?=a)b", "(a)\\1", "\\p{L}+", "", "^$", "[^]",
    "a{99999}", "(a|b){0,1000}", "(((((a)))))", "\\d{3}-\\d{4}", "[\\x00-\\x{10FFFF}]", "\ud800", ".*",
]
TOOL_NAMES = ["get_weather", "no_tool", "", '"q\\', "f" * 200, "\U0001f600", "get_weather"]


def unicode_text() -> st.SearchStrategy[str]:
    return either(choice(UNICODE_EDGES), st.text(max_size=12),
                  st.lists(choice(UNICODE_EDGES), min_size=2, max_size=6).map("".join))


def hostile_value(limits: FuzzLimits) -> st.SearchStrategy[Any]:
    return either(
        choice([None, True, False, [], {}, "", "2", [None], {"": None}]),
        choice(HUGE_INTS), choice(SPECIAL_FLOATS), unicode_text(),
        st.integers(min_value=1, max_value=limits.enormous).map(lambda n: "a " * n),
        st.integers(min_value=1, max_value=limits.enormous // 4).map(lambda n: "\U0001f600" * n),
    )


def nested_schema(depth: int, shape: str) -> dict:
    """A JSON schema `depth` levels deep (`shape`: object, array, anyOf or ref)."""
    inner: dict = {"type": "string"}
    for _ in range(depth):
        if shape == "object":
            inner = {"type": "object", "properties": {"a": inner}, "required": ["a"]}
        elif shape == "array":
            inner = {"type": "array", "items": inner, "minItems": 1}
        else:
            inner = {"anyOf": [inner, {"type": "integer"}]}
    schema = {"type": "object", "properties": {"x": inner}, "required": ["x"]}
    if shape == "ref":  # recursion through $defs
        schema = {"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}},
                  "type": "object", "properties": {"x": {"$ref": "#/$defs/n"}}}
    return schema


def json_schemas(limits: FuzzLimits) -> st.SearchStrategy[Any]:
    return either(
        st.builds(nested_schema, st.integers(0, limits.max_depth), choice(["object", "array", "anyOf", "ref"])),
        choice([
            {"type": "object"}, {"properties": {}}, {"properties": None}, {"properties": {"a": {"type": "nonsense"}}},
            {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, {"properties": {"a": {"pattern": "("}}},
            {"properties": {"a": {"type": "string", "pattern": "a{99999}"}}}, {"properties": {"a": False}},
            {"properties": {"a": {"type": "integer", "minimum": 10, "maximum": 1}}}, {"$ref": "#"},
            {"properties": {"a": {"enum": []}}}, {"properties": {"a": {"type": "string", "format": "email"}}},
            {"properties": {"a": {"type": "string", "minLength": 10**9}}}, [], 5, "{", "{}", '{"properties": {}}',
        ]),
        st.dictionaries(st.text(max_size=5), hostile_value(limits), max_size=3),
    )


def grammars(limits: FuzzLimits) -> st.SearchStrategy[Any]:
    types = choice(["json", "json_object", "regex", "json_schema", "JSON", "", None, 1])
    values = either(json_schemas(limits), choice(REGEXES), st.text(max_size=10),
                    json_schemas(limits).map(lambda s: {"name": "n", "schema": s}),
                    json_schemas(limits).map(lambda s: json.dumps(s) if not isinstance(s, str) else s))
    return either(
        st.fixed_dictionaries({"type": types, "value": values}),
        st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": either(
            values, json_schemas(limits).map(lambda s: {"name": "n", "schema": s, "strict": True}))}),
        st.fixed_dictionaries({"type": choice(["json_object", "regex"])}),
        hostile_value(limits),
    )


def tools(limits: FuzzLimits) -> st.SearchStrategy[Any]:
    arguments = either(json_schemas(limits), choice([
        "not json", "[1, 2]", '{"properties": 5}', "{}", None, {"properties": [1]}, {"required": "a"},
        {"required": [1, None]}, {"properties": {"a": {"type": "string"}}, "required": ["b"]},
        {"properties": {"a": {"type": "string"}}, "additionalProperties": "true"},
    ]))
    function = either(
        st.fixed_dictionaries({"name": choice(TOOL_NAMES), "parameters": arguments},
                              optional={"description": either(st.none(), unicode_text())}),
        st.fixed_dictionaries({"name": choice(TOOL_NAMES), "arguments": arguments}),
        st.fixed_dictionaries({}, optional={"name": hostile_value(limits), "parameters": hostile_value(limits)}),
        hostile_value(limits),
    )
    tool = either(st.fixed_dictionaries({"type": choice(["function", "other"]), "function": function}),
                  st.fixed_dictionaries({"function": function}), hostile_value(limits))
    return either(st.lists(tool, max_size=4), st.lists(tool, min_size=40, max_size=60), hostile_value(limits))


def tool_choices(limits: FuzzLimits) -> st.SearchStrategy[Any]:
    return either(
        choice(["auto", "none", "required", "get_weather", "missing", "no_tool", ""]),
        choice([{"function": "x"}, {"function": {"name": 1}}, {"type": "function"}, {},
                {"type": "function", "function": {"name": "get_weather"}}, {"function": None}]),
        hostile_value(limits),
    )


def stop_lists(limits: FuzzLimits) -> st.SearchStrategy[Any]:
    n = limits.max_stop_sequences
    item = either(choice(["", " ", "\n", "the", "<|im_end|>"]), unicode_text())
    return either(st.lists(item, min_size=n, max_size=n), st.lists(item, min_size=n + 1, max_size=n + 1),
                  st.integers(1, n).map(lambda k: ["x" * 10_000] * k), st.lists(hostile_value(limits), max_size=2))


def risky_numbers(limits: FuzzLimits) -> st.SearchStrategy[Any]:
    return either(choice(HUGE_INTS), choice(SPECIAL_FLOATS),
                  choice([1e-300, 1e-45, 1e-38, -1e-300, 1e30, 0.999999, 1 + 1e-12, 2**31 - 1, -(2**31)]),
                  st.integers(-2, limits.max_input_tokens + 2))


def malformed_bodies(limits: FuzzLimits) -> st.SearchStrategy[tuple[bytes, str | None]]:
    """(body, content type) pairs a JSON parser must refuse cleanly: bytes, deep nesting, NaN, bad UTF-8, too big."""
    depths = choice([100, 990, 1500, 5000, 100_000])
    deep = depths.map(lambda d: (b"[" * d + b"]" * d))
    deep_obj = depths.map(lambda d: (b'{"inputs": "a", "parameters": ' * d + b"1" + b"}" * d))
    bodies = either(
        st.binary(max_size=64), deep, deep_obj,
        choice([b"", b"null", b"[]", b"{", b'{"inputs": NaN}', b'{"inputs": "\\ud800"}', b"\xff\xfe",
                b'{"inputs": "a", "parameters": {"max_new_tokens": Infinity}}', b'"just a string"',
                b'{"inputs": "a", "inputs": 1}', b"\x00", b'{"messages": [{"role": "user"}]}',
                b'{"prompt": "\xed\xa0\x80"}', b"1e999999"]),
        st.integers(1, 100).map(lambda n: b'{"inputs": "' + b"a" * (limits.payload_limit + n) + b'"}'),
    )
    content_types = choice(["application/json", "application/json; charset=latin-1", "text/plain",
                            "application/x-www-form-urlencoded", "APPLICATION/JSON", "", None])
    return st.tuples(bodies, content_types)
