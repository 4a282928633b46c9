"""JSON as TGI's router reads it (serde_json), where Python's `json` is more lenient.

serde_json refuses what `json.loads` accepts: `NaN` / `Infinity` literals and numbers out of the float range
(`1e999`), invalid UTF-8, `\\ud800`-style escapes that leave a lone surrogate, and nesting past its recursion
limit (127 levels). Accepting them lets values through that nothing downstream expects (NaN temperatures, strings
that cannot be encoded to UTF-8 for the engine, schemas that exhaust Python's recursion limit) and turns a client's
malformed body into a 500; here each is a `ValueError`, which callers report as malformed JSON (400).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 127  # serde_json counts down from 128 and fails at 0: at most 127 nested arrays/objects
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def loads(data: str | bytes) -> Any:
    """Parse `data` (bytes must be UTF-8) or raise ValueError."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data  # UnicodeDecodeError is a ValueError
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError as err:
        raise ValueError("recursion limit exceeded") from err
    _check(value)
    return value


def _check(value: Any) -> None:
    """Depth and lone surrogates, walked iteratively (a deep value must not exhaust the stack here either)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise ValueError("lone surrogate in a string")
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError("recursion limit exceeded")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
