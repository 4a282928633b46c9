"""The OpenAI-compatible routes against a real engine: TGI's shapes, key order, SSE framing, errors, templating,
/chat_tokenize and /invocations, through the TestClient and through the real `openai` client."""

from __future__ import annotations

import json
import shutil
import time

import openai
import pytest
from fastapi.testclient import TestClient

from loom.router.app import create_app
from loom.router.chat import ChatTemplate, Message, find_template_source
from loom.router.config import RouterConfig
from loom.router.generation import GenerationResult, StreamItem, Timings, TokenInfo
from loom.router.chat_routes import chat_chunk
from loom.router.openai_routes import completion_event

CHATML_HELLO = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
HELLO = [{"role": "user", "content": "Hello"}]
CHAT_KEYS = ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]
CHUNK_KEYS = ["object", "id", "created", "choices", "model", "system_fingerprint"]


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking TGI's framing (no space after the colon, except in the
    `data: [DONE]` terminator)."""
    assert text.endswith("\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e == "data: [DONE]" or (e.startswith("data:") and not e.startswith("data: ")) for e in events), events
    return [e[len("data:"):].lstrip() for e in events]


def json_events(text: str) -> list[dict]:
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def chat(client, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": HELLO, **body})
    assert r.status_code == 200, r.text
    return r.json()


def greedy_generate(client, inputs: str, n: int) -> dict:
    r = client.post("/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": n, "details": True}})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture()
def router_for(engine_server):
    """A TestClient for a router over another model directory (same engine)."""
    clients = []

    def make(model_dir, **overrides) -> TestClient:
        config = RouterConfig(model_id="loom-test/other", model_dir=str(model_dir), **overrides)
        c = TestClient(create_app(config, engine_server.endpoint, connect_timeout=30))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture()
def no_template_dir(llama_dir, tmp_path):
    """The tiny model's files without any chat template (the ChatML one lives in chat_template.jinja)."""
    out = tmp_path / "no-template"
    shutil.copytree(llama_dir, out)
    assert (out / "chat_template.jinja").is_file()
    (out / "chat_template.jinja").unlink()
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    assert find_template_source(out) is None
    return out


@pytest.fixture()
def oai(client) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="x", http_client=client, max_retries=0)


# ---------------------------------------------------------------------------------------------------------------
# /v1/chat/completions


def test_chat_non_stream_shape_and_key_order(client):
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == CHAT_KEYS
    assert body["object"] == "chat.completion" and body["id"] == ""
    assert body["model"] == "loom-test/tiny-llama" and body["system_fingerprint"].endswith("-native")
    assert isinstance(body["created"], int) and body["created"] > 1_600_000_000
    (choice,) = body["choices"]
    assert list(choice) == ["index", "message", "logprobs", "finish_reason"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert list(choice["message"]) == ["role", "content"] and choice["message"]["role"] == "assistant"
    prompt_tokens = len(client.post("/chat_tokenize", json={"messages": HELLO}).json()["tokenize_response"])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5}
    assert r.headers["x-prompt-tokens"] == str(prompt_tokens) and r.headers["x-generated-tokens"] == "5"
    assert r.headers["x-compute-characters"] == str(len(CHATML_HELLO))


def test_chat_model_is_echoed(client):
    assert chat(client, max_tokens=1, model="my-adapter")["model"] == "my-adapter"
    assert chat(client, max_tokens=1, model="tgi")["model"] == "tgi"


def test_greedy_chat_equals_generate_on_templated_prompt(client):
    tok = client.post("/chat_tokenize", json={"messages": HELLO}).json()
    assert tok["templated_text"] == CHATML_HELLO
    assert [t["text"] for t in tok["tokenize_response"]][:4] == ["<|im_start|>", "user", "\n", "Hello"]
    assert tok["tokenize_response"][1] == {"id": tok["tokenize_response"][1]["id"], "text": "user", "start": 12,
                                           "stop": 16}
    native = greedy_generate(client, tok["templated_text"], 12)
    first = chat(client, max_tokens=12, temperature=0)
    second = chat(client, max_tokens=12, temperature=0)
    assert first["choices"][0]["message"]["content"] == native["generated_text"]
    assert second["choices"][0]["message"]["content"] == native["generated_text"]  # temperature 0: greedy
    assert first["usage"]["completion_tokens"] == native["details"]["generated_tokens"] == 12


def test_seeded_sampling_is_reproducible(client):
    a = chat(client, max_tokens=8, temperature=1.5, seed=7)["choices"][0]["message"]["content"]
    b = chat(client, max_tokens=8, temperature=1.5, seed=7)["choices"][0]["message"]["content"]
    greedy = chat(client, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
    assert a == b and a != greedy


def test_chat_stream_chunks(client):
    full = chat(client, max_tokens=6, temperature=0)
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 6, "temperature": 0,
                                                  "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-compute-characters"] == str(len(CHATML_HELLO))
    chunks = json_events(r.text)
    assert len(chunks) == 6
    for c in chunks:
        assert list(c) == CHAT_KEYS and c["object"] == "chat.completion.chunk" and c["id"] == ""
        assert c["usage"] is None
        (choice,) = c["choices"]
        assert list(choice) == ["index", "delta", "logprobs", "finish_reason"]
        assert list(choice["delta"]) == ["role", "content"] and choice["delta"]["role"] == "assistant"
        assert choice["logprobs"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == full["choices"][0]["message"]["content"]


def test_stream_include_usage(client):
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3, "temperature": 0,
                                                  "stream": True, "stream_options": {"include_usage": True}})
    chunks = json_events(r.text)
    assert len(chunks) == 4
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:-1])
    last = chunks[-1]
    assert list(last) == CHAT_KEYS and last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def test_logprobs_shapes(client):
    body = chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert list(entry) == ["token", "logprob", "top_logprobs"] and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) >= 2
        assert all(list(t) == ["token", "logprob"] for t in entry["top_logprobs"])
        assert entry["top_logprobs"][0] == {"token": entry["token"], "logprob": entry["logprob"]}  # greedy pick
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
    # logprobs without top_logprobs: empty top lists; top_logprobs without logprobs: no logprobs at all
    plain = chat(client, max_tokens=2, temperature=0, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in plain] == [[], []]
    assert chat(client, max_tokens=2, temperature=0, top_logprobs=2)["choices"][0]["logprobs"] is None
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3, "temperature": 0,
                                                  "stream": True, "logprobs": True, "top_logprobs": 1})
    streamed = [c["choices"][0]["logprobs"]["content"] for c in json_events(r.text)]
    assert all(len(lp) == 1 and lp[0]["top_logprobs"][0]["token"] == lp[0]["token"] for lp in streamed)
    assert [lp[0]["token"] for lp in streamed] == [e["token"] for e in content[:3]]


def test_parameter_mapping(client):
    assert chat(client, max_completion_tokens=3, temperature=0)["usage"]["completion_tokens"] == 3
    accepted = chat(client, max_tokens=2, temperature=0, n=3, logit_bias=[0.5])
    assert len(accepted["choices"]) == 1  # n is accepted and unused
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "presence_penalty": -2.0})
    assert r.status_code == 422  # repetition_penalty = presence_penalty + 2.0 = 0
    assert r.json() == {"error": "Input validation error: `repetition_penalty` must be strictly positive",
                        "error_type": "validation"}
    assert chat(client, max_tokens=2, presence_penalty=-1.5)["usage"]["completion_tokens"] == 2
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "top_logprobs": 6})
    assert r.json()["error"] == "Input validation error: `top_n_tokens` must be >= 0 and <= 5. Given: 6"


def test_stop_sequence_passes_through(client):
    text = chat(client, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    stop = greedy_generate(client, CHATML_HELLO, 2)["details"]["tokens"][1]["text"]
    body = chat(client, max_tokens=6, temperature=0, stop=[stop])
    assert body["choices"][0]["finish_reason"] == "stop_sequence"
    assert text.startswith(body["choices"][0]["message"]["content"])
    assert body["choices"][0]["message"]["content"].endswith(stop) and body["usage"]["completion_tokens"] == 2


def test_eos_maps_to_stop_for_chat_but_not_for_streamed_completions():
    eos = TokenInfo(50257, "<|im_end|>", -0.1, True)
    result = GenerationResult("hi", "eos_token", [eos], [], [], None, 3, Timings())
    chunk = chat_chunk("m", "fp", StreamItem(eos, [], result), with_logprobs=False)
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # special token: empty content
    assert chunk["choices"][0]["finish_reason"] == "stop"
    final = completion_event("m", "fp", 1, StreamItem(eos, [], result))
    assert final["choices"] == [{"index": 1, "text": "<|im_end|>", "logprobs": None, "finish_reason": "eos_token"}]
    assert list(final) == ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]
    assert final["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_validation_errors_before_and_inside_streams(client):
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "temperature": -1})
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error: `temperature` must be strictly positive",
                        "error_type": "validation"}
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "temperature": -1, "stream": True})
    assert r.status_code == 200
    assert sse_payloads(r.text) == [
        ('{"error":{"message":"Input validation error: `temperature` must be strictly positive",'
         '"http_status_code":422}}'),
        "[DONE]",
    ]
    r = client.post("/v1/chat/completions", json={"messages": "Hello"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/plain")


def test_tools_and_response_format(client):
    fmt = {"type": "json", "value": {"properties": {"a": {"type": "string"}}}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    exclusive = {"error": "Tool error: Grammar and tools are mutually exclusive", "error_type": "tool_error"}
    for tools in ([], [tool]):
        r = client.post("/v1/chat/completions", json={"messages": HELLO, "tools": tools, "response_format": fmt})
        assert r.status_code == 422 and r.json() == exclusive
    # tool_choice "none" ignores the tools entirely; an empty list is plain chat
    assert chat(client, max_tokens=2, tools=[tool], tool_choice="none")["usage"]["completion_tokens"] == 2
    assert chat(client, max_tokens=2, tools=[])["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("function, choice", [
    ({"name": "f", "parameters": "not json"}, None), ({"name": "f", "parameters": {"properties": [1]}}, None),
    ({"name": "f", "parameters": {"required": 5}}, "required"), ({"name": "f", "parameters": {}}, {"function": "f"}),
])
def test_odd_tool_shapes_are_not_server_errors(client, function, choice):
    """Found by fuzzing: each of these was a 500 (the client fixture raises the server's exception)."""
    body = {"messages": HELLO, "max_tokens": 2, "tools": [{"type": "function", "function": function}]}
    if choice is not None:
        body["tool_choice"] = choice
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert r.json()["error_type"] == "tool_error"

def test_tools_with_no_messages_are_a_template_error(client):
    """Found by fuzzing: the tool prompt was appended to a last message that did not exist (500)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for path in ("/v1/chat/completions", "/chat_tokenize"):
        r = client.post(path, json={"messages": [], "max_tokens": 2, "tools": [tool]})
        assert r.status_code == 422 and r.json()["error_type"] == "template_error", r.text

def test_continue_final_message(client):
    messages = HELLO + [{"role": "assistant", "content": "Once upon a"}]
    tok = client.post("/chat_tokenize", json={"messages": messages}).json()
    assert tok["templated_text"] == CHATML_HELLO + "Once upon a"
    native = greedy_generate(client, tok["templated_text"], 4)
    body = chat(client, messages=messages, max_tokens=4, temperature=0)
    assert body["choices"][0]["message"]["content"] == native["generated_text"]


def test_content_parts_and_tool_call_messages(client):
    parts = [{"type": "text", "text": "Look "}, {"type": "image_url", "image_url": {"url": "https://x.io/a.png"}},
             {"type": "text", "text": " now"}]
    tool_calls = [{"id": "0", "type": "function",
                   "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]
    messages = [{"role": "user", "content": parts, "name": "bob"},
                {"role": "assistant", "content": None, "tool_calls": tool_calls},
                {"role": "tool", "content": "20 degrees", "tool_call_id": "0"}]
    text = client.post("/chat_tokenize", json={"messages": messages}).json()["templated_text"]
    calls = '[{"id":"0","type":"function","function":{"description":null,"name":"get_weather",' \
            '"arguments":"{\\"city\\":\\"Paris\\",\\"unit\\":\\"c\\"}"}}]'
    assert text == ("<|im_start|>user\nLook ![](https://x.io/a.png) now<|im_end|>\n"
                    f"<|im_start|>assistant\n{calls}<|im_end|>\n"
                    "<|im_start|>tool\n20 degrees<|im_end|>\n<|im_start|>assistant\n")
    # OpenAI clients send arguments already as a JSON string: kept as is
    as_string = Message.model_validate({"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]})
    assert json.loads(as_string.flatten()["content"])[0]["function"]["arguments"] == '{"x": 1}'


def test_missing_template(router_for, no_template_dir):
    c = router_for(no_template_dir)
    missing = {"error": "Template error: template not found", "error_type": "template_error"}
    for path in ("/v1/chat/completions", "/chat_tokenize"):
        r = c.post(path, json={"messages": HELLO})
        assert r.status_code == 422 and r.json() == missing
    r = c.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
    assert r.status_code == 422 and r.json() == missing  # templating happens before the stream starts
    assert 'tgi_request_failure{err="template"} 3.0' in c.get("/metrics").text
    assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_tokenizer_config_path_template_and_raise_exception(router_for, no_template_dir, tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('No system role') }}"
                "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": [{"name": "default", "template": template},
                                                 {"name": "tool_use", "template": "unused"}]}))
    c = router_for(no_template_dir, tokenizer_config_path=str(cfg))
    tok = c.post("/chat_tokenize", json={"messages": HELLO}).json()
    assert tok["templated_text"] == "[user] Hello\n[assistant] "
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}] + HELLO})
    assert r.status_code == 422
    assert r.json() == {"error": "Template error: No system role", "error_type": "template_error"}


def test_template_source_priority(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "from processor_config"}))
    assert find_template_source(tmp_path) == "from tokenizer_config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert find_template_source(tmp_path) == "from chat_template.json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert find_template_source(tmp_path) == "from jinja"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "x", "template": "y"}]}))
    assert find_template_source(tmp_path) == "from processor_config"  # a list without "default" is no template


def test_first_chunk_rewrite(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = ChatTemplate(tokenizer, "{{ messages[0]['content'] }}|")
    assert template.apply([Message(role="user", content=[{"type": "text", "text": "a"}])]) == "a|"
    loaded = ChatTemplate.load(tokenizer, tokenizer_dir)
    assert loaded.source is not None and "<|im_start|>" in loaded.source


# ---------------------------------------------------------------------------------------------------------------
# /v1/completions


def test_completions_two_prompts(client):
    prompts = ["Hello world", "The cat"]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]
    assert body["object"] == "text_completion" and body["id"] == "" and body["model"] == "loom-test/tiny-llama"
    assert sorted(c["index"] for c in body["choices"]) == [0, 1]
    for choice in body["choices"]:
        assert list(choice) == ["index", "text", "logprobs", "finish_reason"]
        assert choice["text"] == greedy_generate(client, prompts[choice["index"]], 5)["generated_text"]
        assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt_tokens = sum(len(client.post("/tokenize", json={"inputs": p}).json()) for p in prompts)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 10,
                             "total_tokens": prompt_tokens + 10}
    assert r.headers["x-generated-tokens"] == "10" and r.headers["x-prompt-tokens"] == str(prompt_tokens)
    single = client.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 5, "temperature": 0}).json()
    assert [c["index"] for c in single["choices"]] == [0]


def test_completion_choices_come_in_completion_order(client):
    stop = greedy_generate(client, "The cat", 2)["details"]["tokens"][1]["text"]
    assert stop not in greedy_generate(client, "Hello world", 20)["generated_text"]
    body = client.post("/v1/completions", json={"prompt": ["Hello world", "The cat"], "max_tokens": 20,
                                                "temperature": 0, "stop": [stop]}).json()
    assert [(c["index"], c["finish_reason"]) for c in body["choices"]] == [(1, "stop_sequence"), (0, "length")]


def test_completions_stream_interleaves(client):
    prompts = ["Hello world", "The cat"]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 8, "temperature": 0,
                                             "stream": True})
    assert r.status_code == 200 and r.headers["x-compute-characters"] == str(sum(map(len, prompts)))
    events = json_events(r.text)
    assert len(events) == 16
    order = [e["choices"][0]["index"] for e in events]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # prompt 1 starts before prompt 0 ends
    for i, prompt in enumerate(prompts):
        mine = [e for e in events if e["choices"][0]["index"] == i]
        assert all(list(e) == CHUNK_KEYS and e["choices"][0]["finish_reason"] == "" for e in mine[:-1])
        final = mine[-1]
        assert list(final) == ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]
        assert final["choices"][0]["finish_reason"] == "length"
        assert final["usage"]["completion_tokens"] == 8
        assert "".join(e["choices"][0]["text"] for e in mine) == greedy_generate(client, prompt, 8)["generated_text"]


def test_completions_errors(client):
    r = client.post("/v1/completions", json={"prompt": "Hi", "suffix": "end"})
    assert r.status_code == 422
    assert r.json() == {"error": "Suffix is not supported and can be achieved by preprocessing the prompt.",
                        "error_type": "suffix not supported"}
    r = client.post("/v1/completions", json={"prompt": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 422
    assert r.json() == {"error": "Number of prompts exceeds the maximum allowed batch size of 4",
                        "error_type": "batch size exceeded"}
    r = client.post("/v1/completions", json={"prompt": []})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/plain")
    assert "Empty array detected. Do not use an empty array for the prompt." in r.text
    r = client.post("/v1/completions", json={"prompt": ["Hi", ""], "max_tokens": 2})
    assert r.status_code == 422 and r.json()["error"] == "Input validation error: `inputs` cannot be empty"
    r = client.post("/v1/completions", json={"prompt": ["Hi", ""], "max_tokens": 2, "stream": True})
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    assert ('{"error":{"message":"Input validation error: `inputs` cannot be empty","http_status_code":422}}'
            in payloads)
    assert sum('"finish_reason":"length"' in p for p in payloads) == 1  # the valid prompt still completes


def test_client_batch_size_is_configurable(make_client):
    c = make_client(max_client_batch_size=1)  # the engine serves one router at a time: no `client` here
    r = c.post("/v1/completions", json={"prompt": ["a", "b"], "stream": True})
    assert r.status_code == 422
    assert r.json() == {"error": "Number of prompts exceeds the maximum allowed batch size of 1",
                        "error_type": "batch size exceeded"}
    assert c.post("/v1/completions", json={"prompt": ["a"], "max_tokens": 1}).status_code == 200


def _metric(client, name: str) -> float:
    line = next(l for l in client.get("/metrics").text.splitlines() if l.startswith(name + " "))
    return float(line.split()[-1])


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": ["Hello", "The cat"]}),
    ("/v1/chat/completions", {"messages": HELLO}),
])
def test_client_disconnect_aborts_every_request(client, path, body):
    engine = client.app.state.loom.engine
    successes = _metric(client, "tgi_request_success")
    with client.stream("POST", path, json={**body, "max_tokens": 400, "temperature": 0, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data:"))
    assert '"finish_reason":' in first
    deadline = time.monotonic() + 10
    while engine.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_in_flight == 0
    assert _metric(client, "tgi_request_success") == successes  # aborted, not run to 400 tokens


# ---------------------------------------------------------------------------------------------------------------
# /invocations, metrics, docs


def test_invocations_dispatch(client):
    r = client.post("/invocations", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and isinstance(r.json(), list) and r.json()[0]["generated_text"].startswith("Hello")
    r = client.post("/invocations", json={"messages": HELLO, "max_tokens": 2})
    assert r.json()["object"] == "chat.completion" and r.json()["usage"]["completion_tokens"] == 2
    r = client.post("/invocations", json={"prompt": ["a", "b"], "max_tokens": 2})
    assert r.json()["object"] == "text_completion" and len(r.json()["choices"]) == 2
    r = client.post("/invocations", json={"messages": HELLO, "max_tokens": 2, "stream": True})
    assert json_events(r.text)[-1]["choices"][0]["finish_reason"] == "length"
    r = client.post("/invocations", json={"nothing": 1})
    assert r.status_code == 422 and "did not match any variant of untagged enum SagemakerRequest" in r.text


def test_request_count_and_docs(client):
    before = _metric(client, "tgi_request_count")
    chat(client, max_tokens=1)
    assert _metric(client, "tgi_request_count") - before == 2  # TGI counts the handler and the generate
    client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
    assert _metric(client, "tgi_request_count") - before == 5
    spec = client.get("/api-doc/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/chat_tokenize", "/invocations"} <= set(spec["paths"])


# ---------------------------------------------------------------------------------------------------------------
# The real openai client


def test_openai_client_chat(client, oai):
    expected = chat(client, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    resp = oai.chat.completions.create(model="tgi", messages=HELLO, max_tokens=6, temperature=0)
    assert resp.choices[0].message.content == expected and resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 6 and resp.model == "tgi"
    stream = oai.chat.completions.create(model="tgi", messages=HELLO, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 6 + 10
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="tgi", messages=HELLO, temperature=-1)


def test_openai_client_completions(client, oai):
    resp = oai.completions.create(model="tgi", prompt=["Hello world", "The cat"], max_tokens=4, temperature=0)
    texts = {c.index: c.text for c in resp.choices}
    assert texts == {i: greedy_generate(client, p, 4)["generated_text"] for i, p in enumerate(["Hello world",
                                                                                               "The cat"])}
    assert resp.usage.completion_tokens == 8
    streamed: dict[int, str] = {}
    for event in oai.completions.create(model="tgi", prompt=["Hello world", "The cat"], max_tokens=4,
                                        temperature=0, stream=True):
        streamed[event.choices[0].index] = streamed.get(event.choices[0].index, "") + event.choices[0].text
    assert streamed == texts
    with pytest.raises(openai.UnprocessableEntityError) as err:
        oai.completions.create(model="tgi", prompt="Hi", suffix="x")
    assert err.value.status_code == 422
