"""Tool calling with TGI's semantics (router/src/infer/tool_grammar.rs, router/src/chat.rs).

A request with tools becomes a constrained generation: the grammar forces `{"function": {"_name": <tool>, ...its
arguments}}` over the selected tools, and the tools are described to the model in the prompt. `auto` adds a
synthetic `no_tool` function; choosing it re-runs the request as plain chat. The output is turned back into
OpenAI `tool_calls`, whole (non-stream) or as deltas (stream, `ToolCallStream`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta

from loom.router import strict_json
from loom.router.chat import FunctionDefinition, Message, Tool
from loom.router.errors import ToolError
from loom.router.schemas import GrammarType
from loom.router.streams import compact

DEFAULT_TOOL_PROMPT = (
    "\nGiven the functions available, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt. Respond in the format {name: function name, parameters: dictionary of "
    "argument name and its value}.Do not use variables.\n"
)
NO_TOOL = "no_tool"
_NO_TOOL = Tool(function=FunctionDefinition(
    name=NO_TOOL, description="Open ended response with no specific tool selected", arguments={"type": "object"}))


def selected_tools(tools: list[Tool] | None, tool_choice: str | dict | None) -> list[Tool] | None:
    """The tools the grammar may call, or None for plain chat (no tools, or `tool_choice: "none"`)."""
    if not tools:
        return None
    choice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ToolError("tool_choice must be \"auto\", \"none\", \"required\", a function name or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        choice = name
    if choice == "none":
        return None
    if choice == "auto":
        return [*tools, _NO_TOOL]
    if choice == "required":
        return list(tools)
    named = [t for t in tools if t.function.name == choice]
    if not named:
        raise ToolError(f"Tool with name {choice} not found")
    return named[:1]


def tool_grammar(tools: list[Tool]) -> GrammarType:
    """TGI's `JsonSchemaTool`: `{"function": one of the tools' objects}`, each object naming its tool in `_name`.
    As in TGI, parts of the arguments schema of the wrong JSON type are ignored (arguments that are not an object,
    `properties` that is not an object, `required` that is not an array); a string holding an object is read as
    that object (a Loom extension)."""
    defs = {}
    for tool in tools:
        params = tool.function.arguments
        if isinstance(params, str):
            try:
                params = strict_json.loads(params)
            except ValueError:
                params = None
        params = params if isinstance(params, dict) else {}
        properties = params.get("properties")
        required = params.get("required")
        defs[tool.function.name] = {
            "description": tool.function.description or "",
            "properties": {"_name": {"type": "string", "const": tool.function.name},
                           **(properties if isinstance(properties, dict) else {})},
            "required": ["_name", *(required if isinstance(required, list) else [])],
            # TGI quirk kept: only the *string* "true" opens the object.
            "additionalProperties": params.get("additionalProperties") == "true",
            "type": "object",
        }
    schema = {
        "$defs": defs,
        "type": "object",
        "properties": {"function": {"anyOf": [{"$ref": f"#/$defs/{name}"} for name in defs]}},
        "required": ["function"],
    }
    return GrammarType(type="json", value=schema)


def template_uses_tools(source: str | None) -> bool:
    if source is None:
        return False
    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateSyntaxError:
        return "tools" in source


def with_tool_prompt(messages: list[Message], tools: list[Tool], tool_prompt: str | None,
                     uses_tools: bool) -> tuple[list[Message], list[dict] | None]:
    """Append the tool instructions to the last message (with the tools' JSON when the template cannot show
    them itself). Returns the messages and the `tools` value for the template. No messages: nothing to append
    to (the template then refuses the empty conversation)."""
    prompt = tool_prompt or DEFAULT_TOOL_PROMPT
    serialized = [{"type": t.type, "function": t.function.as_dict()} for t in tools]
    if not messages:
        return messages, (serialized if uses_tools else None)
    suffix = "\n---\n" + prompt if uses_tools else "\n---\n" + compact(serialized) + "\n" + prompt
    last = messages[-1]
    content = last.flatten()["content"] + suffix
    return [*messages[:-1], Message(role=last.role, content=content)], (serialized if uses_tools else None)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # compact JSON of the arguments, in generation order


def parse_tool_call(text: str) -> ParsedCall:
    """`{"function": {"_name": ..., ...}}` → the call. Raises ToolError with TGI's message otherwise."""
    try:
        value = json.loads(text)
        function = value["function"]
        name = function.pop("_name")
        if not isinstance(name, str):
            raise TypeError("`_name` is not a string")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ToolError(f"Failed to parse generated text: {err} {json.dumps(text)}") from err
    return ParsedCall(name, compact(function))


def tool_call_message(call: ParsedCall) -> dict[str, Any]:
    """The non-stream assistant message: no `content` key, id "0" (TGI)."""
    return {"role": "assistant", "tool_calls": [{
        "id": "0", "type": "function",
        "function": {"description": None, "name": call.name, "arguments": call.arguments},
    }]}


def next_tool_call_id(messages: list[Message]) -> str:
    """Stream ids: 1 + the largest integer id among earlier tool calls, "0" if none, a UUID if any id is not an
    integer (TGI)."""
    ids = [c.id for m in messages for c in (m.tool_calls or [])]
    if not ids:
        return "0"
    if not all(re.fullmatch(r"\d+", i) for i in ids):
        return str(uuid.uuid4())
    return str(max(int(i) for i in ids) + 1)


_TRAILING = " \t\r\n,}"
_CALL_HEAD = re.compile(r'\s*\{\s*"function"\s*:\s*\{\s*"_name"\s*:\s*"(?:[^"\\]|\\.)*"\s*,?')


@dataclass
class ToolCallStream:
    """TGI's `ChatState` for tool calls: tokens are buffered until the function name is known; then one delta
    names the function with arguments "{", and every later token is an arguments delta, the final outer `}`
    trimmed, so the deltas concatenate to the arguments object. A `no_tool` choice is reported so the caller can
    re-run as plain chat.

    Unlike TGI, argument text that arrived in the same tokens as the end of the name is not dropped: it follows
    the "{" of the first delta."""

    call_id: str
    text: str = ""
    name: str | None = None
    no_tool: bool = False

    def push(self, token_text: str) -> list[dict]:
        """Feed one token's text; returns the `tool_calls` deltas to emit (possibly none)."""
        self.text += token_text
        if self.name is None:
            try:
                name = json.loads(self.text.rstrip(_TRAILING) + "}}")["function"]["_name"]
            except (ValueError, KeyError, TypeError):
                return []
            if not isinstance(name, str):
                return []
            self.name = name
            if name == NO_TOOL:
                self.no_tool = True
                return []
            head = _CALL_HEAD.match(self.text)
            arguments = "{" + (self.text[head.end():].lstrip() if head else "")
            return [{"index": 0, "id": self.call_id, "type": "function",
                     "function": {"name": name, "arguments": self._trim_outer(arguments)}}]
        if self.no_tool:
            return []
        return [{"index": 0, "id": self.call_id, "type": "function",
                 "function": {"name": None, "arguments": self._trim_outer(token_text)}}]

    def _trim_outer(self, delta: str) -> str:
        """Once the whole call has been generated, its last `}` closes `{"function": ...}`, not the arguments."""
        if "}" in delta and _complete_json(self.text):
            at = delta.rfind("}")
            return delta[:at] + delta[at + 1 :]
        return delta


def _complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
