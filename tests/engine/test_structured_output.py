"""Constrained decoding through the engine: with random weights, every output must still parse and validate
against its JSON schema or fully match its regex, under greedy and seeded sampling, in mixed batches."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loom import LLM, GrammarSpec, SamplingParams
from loom.grammar import GrammarError

SHORT = {"type": "string", "maxLength": 6}
SCHEMAS: dict[str, dict] = {
    "flat": {"type": "object", "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0,
                                                                      "maximum": 120}},
             "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {"address": {
        "type": "object", "properties": {"city": SHORT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["city", "zip"]}}, "required": ["address"]},
    "enum-array": {"type": "object", "properties": {"tags": {
        "type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"]},
    "enum": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"]},
    "bool-null": {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}},
                  "required": ["ok", "none"]},
    "unit-number": {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
                    "required": ["p"]},
    "multiple-of": {"type": "object", "properties": {"q": {"type": "number", "multipleOf": 0.25, "minimum": 0,
                                                           "maximum": 10}}, "required": ["q"]},
    "negative": {"type": "object", "properties": {"n": {"type": "integer", "minimum": -50, "maximum": -1}},
                 "required": ["n"]},
    "optional": {"type": "object", "properties": {"a": SHORT, "b": {"type": "integer", "minimum": 0,
                                                                     "maximum": 9}}},
    "any-of-scalars": {"type": "object", "properties": {"v": {"anyOf": [
        {"type": "string", "maxLength": 4}, {"type": "integer", "minimum": 0, "maximum": 9}]}}, "required": ["v"]},
    "any-of-objects": {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"r": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["r"]},
        {"type": "object", "properties": {"w": {"type": "integer", "minimum": 1, "maximum": 9},
                                          "h": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["w", "h"]}]}}, "required": ["shape"]},
    "array-of-objects": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "label": SHORT},
        "required": ["id"]}}}, "required": ["items"]},
    "const": {"type": "object", "properties": {"version": {"const": "v1"}, "x": {"type": "boolean"}},
              "required": ["version", "x"]},
    "matrix": {"type": "object", "properties": {"m": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        "required": ["m"]},
    "refs": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"]}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"]},
    "email-pattern": {"type": "object", "properties": {"email": {
        "type": "string", "pattern": "^[a-z]{1,5}@[a-z]{1,5}\\.com$"}}, "required": ["email"]},
    "nullable": {"type": "object", "properties": {"s": {"type": ["string", "null"], "maxLength": 3}},
                 "required": ["s"]},
    "length-range": {"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 4}},
                     "required": ["code"]},
    "tuple": {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [
        {"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["a", "b"]}], "items": False}},
        "required": ["pair"]},
    "deep": {"type": "object", "required": ["l1"], "properties": {"l1": {
        "type": "object", "required": ["l2"], "properties": {"l2": {
            "type": "object", "required": ["l3"], "properties": {"l3": {"type": "boolean"}}}}}}},
    "mixed-enum": {"type": "object", "properties": {"e": {"enum": [1, "a", None, True]}}, "required": ["e"]},
    "weather": {"type": "object", "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "temperature": {"type": "array", "items": {"type": "integer", "minimum": -20, "maximum": 50},
                        "maxItems": 3}}, "required": ["unit", "temperature"]},
}
REGEXES = [r"\d{3}-\d{4}", r"(yes|no)", r"[A-Z][a-z]{2,6}( [A-Z][a-z]{2,6})?",
           r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)", r"\{\"a\": [0-9]\}", r"(ab|cd){1,5}!"]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", max_batch_total_tokens=16384)


def _params(grammar: GrammarSpec, sample: bool, seed: int) -> SamplingParams:
    if sample:
        return SamplingParams(max_new_tokens=160, do_sample=True, temperature=1.0, seed=seed, grammar=grammar)
    return SamplingParams(max_new_tokens=160, grammar=grammar)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_every_json_output_validates(llm, sample):
    names = list(SCHEMAS)
    params = [_params(GrammarSpec.json_schema(SCHEMAS[n]), sample, seed=i) for i, n in enumerate(names)]
    results = llm.generate([f"Give me {n} as JSON:" for n in names], params, use_tqdm=False)
    for name, result in zip(names, results):
        assert result.finish_reason == "eos_token", (name, result.text)
        jsonschema.validate(json.loads(result.text), SCHEMAS[name])


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_every_regex_output_matches(llm, sample):
    params = [_params(GrammarSpec.regex(rx), sample, seed=i) for i, rx in enumerate(REGEXES)]
    results = llm.generate(["Answer:"] * len(REGEXES), params, use_tqdm=False)
    for rx, result in zip(REGEXES, results):
        assert result.finish_reason == "eos_token", (rx, result.text)
        assert re.fullmatch(rx, result.text), (rx, result.text)


def test_unconstrained_requests_are_unaffected(llm):
    plain = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, do_sample=True, seed=5)]
    prompts = ["The weather today", "Once upon a time"]
    alone = [r.token_ids for r in llm.generate(prompts, plain, use_tqdm=False)]
    guided = SamplingParams(max_new_tokens=40, grammar=GrammarSpec.json_schema(SCHEMAS["flat"]))
    mixed = llm.generate([prompts[0], "JSON:", prompts[1]], [plain[0], guided, plain[1]], use_tqdm=False)
    assert [mixed[0].token_ids, mixed[2].token_ids] == alone
    assert json.loads(mixed[1].text)["age"] <= 120


def test_objects_are_closed_unless_the_schema_opens_them():
    from loom.grammar.spec import closed_objects

    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}}},
              "$defs": {"d": {"properties": {"x": {}}}}, "anyOf": [{"properties": {}}],
              "items": {"properties": {}, "additionalProperties": True}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]  # a property named "properties" stays a property
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert closed["items"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the input is not modified


def test_invalid_grammars_are_rejected_before_queueing(llm):
    with pytest.raises(GrammarError):
        llm.generate(["x"], SamplingParams(max_new_tokens=4, grammar=GrammarSpec.regex("(unclosed")),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished()
