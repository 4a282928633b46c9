"""Structured output and tools through the HTTP API (TestClient and the real `openai` client): TGI's grammar
shapes and validation messages, tool calls whole and streamed, the `no_tool` fallback."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from loom.router.tools import DEFAULT_TOOL_PROMPT

HELLO = [{"role": "user", "content": "What is the weather like in Brooklyn?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"]}
WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 12},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location", "format"]}}}
FORECAST = {"type": "function", "function": {
    "name": "get_n_day_weather_forecast", "description": "Get an N-day weather forecast",
    "parameters": {"type": "object", "properties": {
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "num_days": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["format", "num_days"]}}}
TOOL_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, FORECAST)}


def sse_json(text: str) -> list[dict]:
    """The JSON events of an SSE body (OpenAI streams end with `[DONE]`, native ones do not)."""
    payloads = [e[len("data:"):].strip() for e in text.split("\n\n") if e]
    return [json.loads(p) for p in payloads if p != "[DONE]"]


def generate(client, grammar, stream=False, **params):
    body = {"inputs": "My details:", "parameters": {"max_new_tokens": 80, "grammar": grammar, **params}}
    return client.post("/generate_stream" if stream else "/generate", json=body)


@pytest.mark.parametrize("grammar", [
    {"type": "json", "value": PERSON},
    {"type": "json_object", "value": PERSON},
    {"type": "json", "value": json.dumps(PERSON)},  # a string holding the schema
    {"type": "json_schema", "value": {"name": "person", "schema": PERSON, "strict": True}},
    {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},  # OpenAI's shape (extension)
], ids=["json", "json_object", "json-string", "json_schema", "openai-json_schema"])
def test_generate_with_json_grammar(client, grammar):
    r = generate(client, grammar, details=True)
    assert r.status_code == 200, r.text
    assert r.json()["details"]["finish_reason"] == "eos_token"
    jsonschema.validate(json.loads(r.json()["generated_text"]), PERSON)


def test_streamed_json_concatenates_to_a_valid_document(client):
    for params in ({}, {"do_sample": True, "seed": 7}):
        events = sse_json(generate(client, {"type": "json", "value": PERSON}, stream=True, **params).text)
        text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
        assert events[-1]["generated_text"] == text
        jsonschema.validate(json.loads(text), PERSON)


def test_regex_grammar(client):
    r = generate(client, {"type": "regex", "value": r"[0-9]{3}-[a-z]{2,4}"}, do_sample=True, seed=3)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", r.json()["generated_text"]), r.text


def test_chat_response_format(client):
    for fmt in ({"type": "json_object", "value": PERSON},
                {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}):
        r = client.post("/v1/chat/completions", json={"messages": HELLO, "response_format": fmt, "seed": 1})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)
    any_object = client.post("/v1/chat/completions", json={
        "messages": HELLO, "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 60})
    assert any_object.status_code == 200, any_object.text


@pytest.mark.parametrize(("grammar", "message"), [
    ({"type": "json", "value": 5}, "grammar is not supported"),
    ({"type": "json", "value": {"type": "object"}}, "grammar is not valid: Grammar must have a 'properties' field"),
    ({"type": "json", "value": {"properties": {}, "type": 5}}, "grammar is not valid: 5 is not valid under any "
                                                               "of the given schemas"),
    ({"type": "json", "value": "{not json"}, "grammar is not valid: Expecting property name enclosed in double "
                                             "quotes: line 1 column 2 (char 1)"),
    ({"type": "regex", "value": "(unclosed"}, "grammar is not valid: "),
    ({"type": "json_schema", "value": {"name": "x"}}, "grammar is not supported"),
])
def test_grammar_validation_messages(client, grammar, message):
    r = generate(client, grammar)
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith("Input validation error: " + message), r.json()


def test_disable_grammar_support(make_client):
    client = make_client(disable_grammar_support=True)
    r = generate(client, {"type": "json", "value": PERSON})
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error: grammar is not supported", "error_type": "validation"}


# ---------------------------------------------------------------------------------------------------------------
# Tools


def tool_chat(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "tools": [WEATHER, FORECAST],
                                                  "max_tokens": 120, **body})
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize(("choice", "expected"), [
    ("required", None),
    ("get_n_day_weather_forecast", "get_n_day_weather_forecast"),
    ({"type": "function", "function": {"name": "get_current_weather"}}, "get_current_weather"),
])
def test_tool_call_non_stream(client, choice, expected):
    for body in ({"temperature": 0}, {"seed": 11}):
        message = tool_chat(client, tool_choice=choice, **body).json()["choices"][0]["message"]
        assert "content" not in message and message["role"] == "assistant"
        [call] = message["tool_calls"]
        assert call["id"] == "0" and call["type"] == "function" and call["function"]["description"] is None
        name = call["function"]["name"]
        assert name == expected if expected else name in TOOL_PARAMS
        jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL_PARAMS[name])


def test_streamed_tool_call_equals_the_whole_one(client):
    whole = tool_chat(client, tool_choice="required", temperature=0).json()["choices"][0]["message"]
    events = sse_json(tool_chat(client, tool_choice="required", temperature=0, stream=True).text)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert all("content" not in d for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    first, rest = calls[0], calls[1:]
    assert first["function"]["name"] == whole["tool_calls"][0]["function"]["name"]
    assert first["function"]["arguments"].startswith("{")  # plus any argument text the name's tokens carried
    assert all(c["function"]["name"] is None and c["id"] == "0" and c["index"] == 0 for c in rest)
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments) == json.loads(whole["tool_calls"][0]["function"]["arguments"])
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_tool_call_id_follows_the_history(client):
    history = HELLO + [
        {"role": "assistant", "tool_calls": [{"id": "4", "type": "function", "function": {
            "name": "get_current_weather", "arguments": {"location": "Paris", "format": "celsius"}}}]},
        {"role": "tool", "content": "20 degrees", "tool_call_id": "4"},
        {"role": "user", "content": "And tomorrow?"}]
    events = sse_json(tool_chat(client, messages=history, tool_choice="required", temperature=0, stream=True).text)
    ids = {e["choices"][0]["delta"]["tool_calls"][0]["id"] for e in events if "tool_calls" in e["choices"][0]["delta"]}
    assert ids == {"5"}


def test_auto_falls_back_to_plain_chat_on_no_tool(client):
    """With `auto` the model may pick `no_tool`: the request is re-run without tools, so its answer equals a plain
    chat with the same seed. Seeds are fixed, so which ones pick it is deterministic."""
    outcomes = set()
    for seed in range(12):
        message = tool_chat(client, seed=seed).json()["choices"][0]["message"]
        if "tool_calls" in message:
            outcomes.add("tool")
            call = message["tool_calls"][0]["function"]
            jsonschema.validate(json.loads(call["arguments"]), TOOL_PARAMS[call["name"]])
            continue
        outcomes.add("no_tool")
        plain = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 120, "seed": seed})
        assert message["content"] == plain.json()["choices"][0]["message"]["content"]
        streamed = sse_json(tool_chat(client, seed=seed, stream=True).text)
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in streamed) == message["content"]
        assert all("tool_calls" not in e["choices"][0]["delta"] for e in streamed)
    assert outcomes == {"tool", "no_tool"}


def test_tool_prompt_is_appended_to_the_last_message(client):
    body = {"messages": HELLO, "tools": [WEATHER], "tool_choice": "required"}
    text = client.post("/chat_tokenize", json=body).json()["templated_text"]
    tools_json = json.dumps([{"type": "function", "function": {
        "description": "Get the current weather", "name": "get_current_weather",
        "arguments": json.dumps(WEATHER["function"]["parameters"], separators=(",", ":"))}}], separators=(",", ":"))
    assert HELLO[0]["content"] + "\n---\n" + tools_json + "\n" + DEFAULT_TOOL_PROMPT in text
    custom = client.post("/chat_tokenize", json={**body, "tool_prompt": "Use a tool."}).json()["templated_text"]
    assert "\n---\n" + tools_json + "\nUse a tool." in custom


def test_tool_errors(client):
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "tools": [WEATHER], "tool_choice": "nope"})
    assert r.status_code == 422
    assert r.json() == {"error": "Tool error: Tool with name nope not found", "error_type": "tool_error"}
    # cut short by max_tokens, the call cannot be parsed: TGI's 422
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "tools": [WEATHER], "tool_choice": "required",
                                                  "max_tokens": 3, "temperature": 0})
    assert r.status_code == 422 and r.json()["error_type"] == "tool_error"
    assert r.json()["error"].startswith("Tool error: Failed to parse generated text: ")


def test_openai_client_tools(client):
    oai = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="x", http_client=client, max_retries=0)
    completion = oai.chat.completions.create(model="tgi", messages=HELLO, tools=[WEATHER, FORECAST],
                                             tool_choice="required", temperature=0, max_tokens=120)
    call = completion.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), TOOL_PARAMS[call.function.name])
    stream = oai.chat.completions.create(model="tgi", messages=HELLO, tools=[WEATHER, FORECAST],
                                         tool_choice="required", temperature=0, max_tokens=120, stream=True)
    arguments, names = "", []
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            names.append(delta_call.function.name)
            arguments += delta_call.function.arguments or ""
    assert names[0] == call.function.name and set(names[1:]) == {None}
    assert json.loads(arguments) == json.loads(call.function.arguments)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_every_schema_streamed(client, sample):
    """The engine test's 22 schemas through /generate_stream: the concatenated tokens validate."""
    from tests.engine.test_structured_output import SCHEMAS

    for i, (name, schema) in enumerate(SCHEMAS.items()):
        params = {"max_new_tokens": 160, "details": True, "grammar": {"type": "json", "value": schema}}
        if sample:
            params.update(do_sample=True, seed=i)
        events = sse_json(client.post("/generate_stream", json={"inputs": f"{name}:", "parameters": params}).text)
        assert events[-1]["details"]["finish_reason"] == "eos_token", (name, events[-1])
        text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
        jsonschema.validate(json.loads(text), schema)
