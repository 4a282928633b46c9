"""`grammar` / `response_format` validation with TGI's rules and messages (router/src/validation.rs), producing
the engine's `GrammarSpec`.

JSON: the value is an object (or a string holding one), valid under JSON Schema draft 2020-12, with a top-level
`properties`; then it must compile. Regex: it must compile (TGI defers that to the shard and fails with a 424; Loom
answers 422 at once). Extensions, documented in docs/compatibility.md: OpenAI's `{"type": "json_schema",
"json_schema": {...}}` shape, and `{"type": "json_object"}` without a value meaning "any JSON object".
"""

from __future__ import annotations

from typing import Any

import jsonschema

from loom.grammar.spec import GrammarError, GrammarSpec
from loom.router import strict_json
from loom.router.errors import ValidationError, scrub
from loom.router.schemas import GrammarType

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def grammar_spec(grammar: GrammarType, disabled: bool) -> GrammarSpec:
    if disabled:
        raise ValidationError("grammar is not supported")
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise ValidationError("grammar is not supported")
        spec = GrammarSpec.regex(grammar.value)
        _compile(spec, "grammar is not valid: ")
        return spec
    schema = _schema_of(grammar)
    if not isinstance(schema, dict):
        raise ValidationError("grammar is not supported")
    if schema is not ANY_OBJECT:
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ValidationError(f"grammar is not valid: {err.message}") from err
        if "properties" not in schema:
            raise ValidationError("grammar is not valid: Grammar must have a 'properties' field")
    spec = GrammarSpec.json_schema(schema)
    _compile(spec, "cannot compile regex from schema: ")
    return spec


def _schema_of(grammar: GrammarType) -> Any:
    value = grammar.value
    if grammar.type == "json_schema":
        config = value if value is not None else grammar.json_schema  # TGI's shape, else OpenAI's
        if not isinstance(config, dict) or "schema" not in config:
            raise ValidationError("grammar is not supported")
        value = config["schema"]
    elif value is None and grammar.type == "json_object":
        return ANY_OBJECT  # OpenAI's JSON mode
    if isinstance(value, str):
        try:
            value = strict_json.loads(value)
        except ValueError as err:
            raise ValidationError(f"grammar is not valid: {scrub(str(err))}") from err
    return value


def _compile(spec: GrammarSpec, prefix: str) -> None:
    try:
        spec.check()
    except GrammarError as err:
        raise ValidationError(f"{prefix}{scrub(str(err))}") from err
