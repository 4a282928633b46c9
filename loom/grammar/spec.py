"""What a constrained request asks for, independent of the engine: a JSON schema or a regular expression.

TGI compiles every grammar to a regex with outlines, which gives JSON schemas two behaviours this module keeps:
objects admit only their declared properties unless `additionalProperties` says otherwise, and at most one space
may separate JSON tokens. Both also keep generation finite where plain JSON-schema semantics would not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import llguidance

# outlines' JSON whitespace (`[ ]?`), which TGI's grammars inherit: models that write `{"a": 1}` keep their habit,
# and random-weight models cannot spin in whitespace forever.
JSON_OPTIONS = {"whitespace_pattern": "[ ]?"}


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message says why."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: Literal["json", "regex"]
    value: str  # the JSON schema as canonical JSON text, or the regex

    @staticmethod
    def json_schema(schema: dict[str, Any] | str) -> GrammarSpec:
        if isinstance(schema, str):
            schema = json.loads(schema)
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object")
        # Key order is kept: llguidance emits properties in the order the schema lists them.
        return GrammarSpec("json", json.dumps(schema, separators=(",", ":")))

    @staticmethod
    def regex(pattern: str) -> GrammarSpec:
        return GrammarSpec("regex", pattern)

    def to_llguidance(self) -> str:
        """The grammar in llguidance's serialized form (cached per spec)."""
        return _compile(self.kind, self.value)

    def check(self) -> None:
        """Raise GrammarError unless llguidance can build this grammar (no tokenizer needed)."""
        error = llguidance.LLMatcher.validate_grammar(self.to_llguidance())
        if error:
            raise GrammarError(error)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` in which every object schema that declares `properties` and says nothing about
    `additionalProperties` admits no others (outlines', hence TGI's, reading)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = closed_objects(out[key]) if not isinstance(out[key], list) else [
                closed_objects(sub) for sub in out[key]]
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=256)
def _compile(kind: str, value: str) -> str:
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(closed_objects(json.loads(value)),
                                                             overrides=JSON_OPTIONS)
    except ValueError as err:
        raise GrammarError(str(err)) from err
