"""Tool-call pieces without an engine: selection, TGI's grammar shape, output parsing, the stream state machine."""

from __future__ import annotations

import json

import pytest

from loom.router.chat import Message, Tool
from loom.router.errors import ToolError
from loom.router.tools import (
    NO_TOOL,
    ToolCallStream,
    next_tool_call_id,
    parse_tool_call,
    selected_tools,
    template_uses_tools,
    tool_grammar,
)

WEATHER = Tool.model_validate({"type": "function", "function": {
    "name": "get_current_weather", "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "format": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "format"]}}})
OTHER = Tool.model_validate({"function": {"name": "other", "arguments": {"properties": {}},
                                          "description": "d"}})


def test_selection():
    assert selected_tools(None, "auto") is None and selected_tools([], None) is None
    assert selected_tools([WEATHER], "none") is None
    assert [t.function.name for t in selected_tools([WEATHER, OTHER], None)] == [
        "get_current_weather", "other", NO_TOOL]
    assert selected_tools([WEATHER, OTHER], "required") == [WEATHER, OTHER]
    assert selected_tools([WEATHER, OTHER], "other") == [OTHER]
    assert selected_tools([WEATHER, OTHER], {"type": "function", "function": {"name": "other"}}) == [OTHER]
    with pytest.raises(ToolError, match="Tool with name missing not found"):
        selected_tools([WEATHER], "missing")


def test_grammar_shape():
    schema = tool_grammar([WEATHER, OTHER]).value
    weather = schema["$defs"]["get_current_weather"]
    assert weather["properties"]["_name"] == {"type": "string", "const": "get_current_weather"}
    assert weather["required"] == ["_name", "location", "format"] and weather["additionalProperties"] is False
    assert schema["properties"]["function"]["anyOf"] == [{"$ref": "#/$defs/get_current_weather"},
                                                          {"$ref": "#/$defs/other"}]
    opened = Tool.model_validate({"function": {"name": "o", "parameters": {"additionalProperties": "true"}}})
    assert tool_grammar([opened]).value["$defs"]["o"]["additionalProperties"] is True  # TGI: only the string


@pytest.mark.parametrize("arguments", ["not json", "[1, 2]", None, 5, {"properties": [1]}, {"required": "a"},
                                       {"properties": "x", "required": {"a": 1}}])
def test_grammar_ignores_arguments_of_the_wrong_type(arguments):
    """Found by fuzzing (each was a 500): as in TGI, only an object's `properties` object and `required` array count."""
    tool = Tool.model_validate({"function": {"name": "f", "arguments": arguments}})
    f = tool_grammar([tool]).value["$defs"]["f"]
    assert f["properties"] == {"_name": {"type": "string", "const": "f"}} and f["required"] == ["_name"]
    as_string = Tool.model_validate({"function": {"name": "f", "arguments": '{"properties": {"a": {}}}'}})
    assert "a" in tool_grammar([as_string]).value["$defs"]["f"]["properties"]


@pytest.mark.parametrize("choice", [{"function": "f"}, {"function": None}, {"function": {"name": 1}}, {}])
def test_odd_tool_choice_objects_are_a_tool_error(choice):
    with pytest.raises(ToolError, match="tool_choice must be"):
        selected_tools([OTHER], choice)

def test_parse_keeps_argument_order():
    call = parse_tool_call('{"function": {"_name": "get_current_weather", "location": "Paris", "format": "celsius"}}')
    assert (call.name, call.arguments) == ("get_current_weather", '{"location":"Paris","format":"celsius"}')
    with pytest.raises(ToolError, match=r'^Failed to parse generated text: .* "\{\\"function\\": \{"$'):
        parse_tool_call('{"function": {')


def test_stream_state_machine_tgi_example():
    tokens = ['{"', "function", '":', ' {"', "_", "name", '":', ' "', "get", "_current", "_weather", '",', ' "',
              "location", '":', ' "', "Brooklyn", ",", " NY", '",', ' "', "format", '":', ' "', "fahrenheit", '"}}']
    stream = ToolCallStream("0")
    deltas = [d for t in tokens for d in stream.push(t)]
    assert deltas[0] == {"index": 0, "id": "0", "type": "function",
                         "function": {"name": "get_current_weather", "arguments": "{"}}
    assert all(d["function"]["name"] is None for d in deltas[1:])
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    assert arguments == '{ "location": "Brooklyn, NY", "format": "fahrenheit"}'  # TGI's concatenation
    assert json.loads(arguments) == {"location": "Brooklyn, NY", "format": "fahrenheit"}


def test_stream_keeps_arguments_that_share_a_token_with_the_name():
    stream = ToolCallStream("0")
    deltas = [d for t in ['{"function": {"_name": "f", "a": 1', ', "b": 2}}'] for d in stream.push(t)]
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"a": 1, "b": 2}'
    no_args = ToolCallStream("0")
    assert no_args.push('{"function": {"_name": "g"}}')[0]["function"]["arguments"] == "{}"


def test_stream_detects_no_tool():
    stream = ToolCallStream("0")
    assert [d for t in ['{"function": {"_name": "no', '_tool"', "}}"] for d in stream.push(t)] == []
    assert stream.no_tool


def test_stream_ids_follow_history():
    def calls(*ids):
        return Message.model_validate({"role": "assistant", "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "f", "arguments": {}}} for i in ids]})

    assert next_tool_call_id([Message(role="user", content="hi")]) == "0"
    assert next_tool_call_id([calls("0", "3"), calls("1")]) == "4"
    assert len(next_tool_call_id([calls("call_abc")])) == 36  # a UUID


def test_template_uses_tools():
    assert template_uses_tools("{% for t in tools %}{{ t }}{% endfor %}{{ messages }}")
    assert not template_uses_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_uses_tools(None)


def test_tool_prompt_with_a_template_that_shows_tools():
    from loom.router.tools import DEFAULT_TOOL_PROMPT, with_tool_prompt

    messages = [Message(role="system", content="s"), Message(role="user", content="q")]
    out, template_tools = with_tool_prompt(messages, [WEATHER], None, uses_tools=True)
    assert out[-1].content == "q\n---\n" + DEFAULT_TOOL_PROMPT and out[0] is messages[0]
    assert template_tools == [{"type": "function", "function": {
        "description": None, "name": "get_current_weather",
        "arguments": json.dumps(WEATHER.function.arguments, separators=(",", ":"))}}]
    out, template_tools = with_tool_prompt(messages, [WEATHER], "Pick one.", uses_tools=False)
    assert out[-1].content.startswith("q\n---\n[{") and out[-1].content.endswith("\nPick one.")
    assert template_tools is None
