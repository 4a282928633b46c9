"""The real launcher with the clients people already use: text-generation, huggingface_hub, raw HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import requests
from huggingface_hub import InferenceClient
from text_generation import AsyncClient, Client
from text_generation.errors import OverloadedError, ValidationError

from loom import LLM, SamplingParams


def test_text_generation_client_matches_offline_llm(server, llama_dir):
    client = Client(server.url, timeout=60)
    r = client.generate("Hello world", max_new_tokens=16, decoder_input_details=False)
    offline = LLM(llama_dir, dtype="float32", max_batch_total_tokens=512).generate(
        ["Hello world"], SamplingParams(max_new_tokens=16))[0]
    assert r.generated_text == offline.text
    assert [t.id for t in r.details.tokens] == offline.token_ids
    assert r.details.finish_reason.value == offline.finish_reason
    streamed = [resp for resp in client.generate_stream("Hello world", max_new_tokens=16)]
    assert "".join(s.token.text for s in streamed) == r.generated_text
    assert streamed[-1].generated_text == r.generated_text
    with pytest.raises(ValidationError, match="`temperature` must be strictly positive"):
        client.generate("Hello", temperature=-1.0)


def test_text_generation_async_client(server):
    async def run():
        client = AsyncClient(server.url, timeout=60)
        results = await asyncio.gather(*(client.generate(f"Prompt {i}", max_new_tokens=6) for i in range(3)))
        events = [e async for e in client.generate_stream("Prompt 0", max_new_tokens=6)]
        return results, events

    results, events = asyncio.run(run())
    assert all(r.details.generated_tokens == 6 or r.details.finish_reason.value == "eos_token" for r in results)
    assert events[-1].generated_text == results[0].generated_text


def test_huggingface_hub_inference_client(server):
    client = InferenceClient(base_url=server.url)
    text = client.text_generation("Hello world", max_new_tokens=8)
    # POST / returns the full text unless asked otherwise (TGI: pipeline tag text-generation or unknown)
    assert text.startswith("Hello world") and len(text) > len("Hello world")
    out = client.text_generation("Hello world", max_new_tokens=8, details=True)
    assert out.details.generated_tokens <= 8 and out.generated_text == text
    assert client.text_generation("Hello world", max_new_tokens=8, return_full_text=False) == text[11:]
    chunks = list(client.text_generation("Hello world", max_new_tokens=8, stream=True))
    assert "Hello world" + "".join(chunks) == text


def test_raw_sse_framing(server):
    r = requests.post(f"{server.url}/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}},
                      stream=True, timeout=60)
    raw = r.content.decode()
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-compute-type"] == "1-cpu"  # "{num_shard}-{device}", as TGI's launcher sets it
    assert raw.startswith("data:{") and raw.endswith("}\n\n") and "[DONE]" not in raw


def test_overload_returns_429(server):
    """--max-concurrent-requests 3: three streams in flight hold every permit."""
    stop = threading.Event()
    opened = threading.Barrier(4)

    def hold():
        with requests.post(f"{server.url}/generate_stream", stream=True, timeout=120,
                           json={"inputs": "Hold", "parameters": {"max_new_tokens": 500}}) as r:
            lines = r.iter_lines()
            next(lines)
            opened.wait()
            stop.wait(30)

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    opened.wait(timeout=60)
    try:
        r = requests.post(f"{server.url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
        assert r.status_code == 429
        assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        with pytest.raises(OverloadedError):
            Client(server.url).generate("x", max_new_tokens=1)
    finally:
        stop.set()
        for t in threads:
            t.join()


def _metric(server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_disconnect_aborts_and_frees_blocks(server):
    dropped = _metric(server, 'tgi_request_failure{err="dropped"}')
    with requests.post(f"{server.url}/generate_stream", stream=True, timeout=60,
                       json={"inputs": "Bye", "parameters": {"max_new_tokens": 500}}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data:")
    deadline = time.monotonic() + 30
    while _metric(server, 'tgi_request_failure{err="dropped"}') <= dropped:
        assert time.monotonic() < deadline, "disconnect was not noticed"
        time.sleep(0.2)
    # the gauges are true once the engine is idle, though no step followed the abort (issue 18's finding)
    while _metric(server, "tgi_batch_current_size") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(server, "tgi_batch_current_size") == 0 and _metric(server, "tgi_queue_size") == 0
    # /health runs the engine's KV integrity check when idle: no block held by the aborted request
    assert requests.get(f"{server.url}/health").status_code == 200
    r = requests.post(f"{server.url}/generate", json={"inputs": "Again", "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200


def test_api_key_and_payload_limit(launch):
    s = launch("--api-key", "s3cret", "--payload-limit", "1000")
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    r = requests.post(f"{s.url}/generate", json=body)
    assert r.status_code == 401 and r.content == b""
    r = requests.post(f"{s.url}/generate", json=body, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert requests.get(f"{s.url}/health").status_code == 200
    r = requests.post(f"{s.url}/generate", json={"inputs": "x" * 5000}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 413
    assert json.loads(requests.get(f"{s.url}/info").text)["max_total_tokens"] == 512


def test_openai_client_chat_and_completions(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Say something"}]
    chat = client.chat.completions.create(model="tgi", messages=messages, max_tokens=8, temperature=0)
    templated = requests.post(f"{server.url}/chat_tokenize", json={"messages": messages}).json()["templated_text"]
    native = requests.post(f"{server.url}/generate", json={"inputs": templated, "parameters": {
        "max_new_tokens": 8}}).json()
    assert chat.choices[0].message.content == native["generated_text"]
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="tgi", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    completion = client.completions.create(model="tgi", prompt="Hello world", max_tokens=6, temperature=0)
    offline = requests.post(f"{server.url}/generate", json={"inputs": "Hello world", "parameters": {
        "max_new_tokens": 6}}).json()
    assert completion.choices[0].text == offline["generated_text"]


def test_json_output_logs_one_object_per_line_with_request_timings(launch):
    s = launch("--json-output")
    r = requests.post(f"{s.url}/generate", json={"inputs": "secret prompt text", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while "request done" not in s.logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [ln for ln in s.logs().splitlines() if ln.startswith("{")]
    entries = [json.loads(ln) for ln in lines]  # every JSON-looking line parses
    done = [e for e in entries if e["message"].startswith("request done")]
    assert len(done) == 1
    fields = done[0]["fields"]
    assert fields["input_tokens"] == 3 and fields["generated_tokens"] <= 3
    assert fields["total_time"] >= fields["inference_time"] >= 0 and fields["queue_time"] >= 0
    assert "secret prompt text" not in s.logs()  # the prompt is logged only at debug level


def test_huggingface_hub_tools_and_grammars(server):
    """Tool calls and response formats through huggingface_hub's client, and a grammar through text-generation's."""
    import jsonschema

    weather = {"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the current weather",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "maxLength": 12}, "format": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["location", "format"]}}}
    messages = [{"role": "user", "content": "Weather in Brooklyn?"}]
    client = InferenceClient(base_url=server.url)
    out = client.chat_completion(messages, tools=[weather], tool_choice="get_current_weather", max_tokens=80,
                                 temperature=0)
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_current_weather" and call.id == "0"
    arguments = call.function.arguments
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments,
                        weather["function"]["parameters"])
    chunks = list(client.chat_completion(messages, tools=[weather], tool_choice="get_current_weather",
                                         max_tokens=80, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.tool_calls[0].function.arguments
                       for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert json.loads(streamed) == (json.loads(arguments) if isinstance(arguments, str) else arguments)

    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"]}
    out = client.chat_completion(messages, response_format={"type": "json", "value": person}, max_tokens=60,
                                 seed=4)
    jsonschema.validate(json.loads(out.choices[0].message.content), person)
    from text_generation.types import Grammar, GrammarType

    r = Client(server.url, timeout=60).generate("Age:", max_new_tokens=20,
                                                grammar=Grammar(type=GrammarType.Regex, value="[0-9]{2}"))
    assert len(r.generated_text) == 2 and r.generated_text.isdigit()


def test_text_generation_client_watermark(server, llama_dir):
    """`watermark=True` through TGI's own client: the tokens carry the green-list watermark a detector written for
    TGI's hashing finds (the tiny model's near-uniform distribution makes it strong), the same tokens as the
    offline engine's watermarked generation; without it the text is not watermarked."""
    from transformers import AutoTokenizer

    from loom.testing.tiny_models import PADDED_VOCAB

    from ..watermark_detector import z_score

    client = Client(server.url, timeout=60)
    prompt = "The watermark test prompt"
    marked = client.generate(prompt, max_new_tokens=40, watermark=True, do_sample=True, seed=5)
    plain = client.generate(prompt, max_new_tokens=40, do_sample=True, seed=5)
    ids = AutoTokenizer.from_pretrained(llama_dir).encode(prompt)
    vocab = PADDED_VOCAB  # the logits' width: the green list is a permutation of it, as in TGI
    marked_ids = [t.id for t in marked.details.tokens]
    assert z_score(ids, marked_ids, vocab) > 4
    assert abs(z_score(ids, [t.id for t in plain.details.tokens], vocab)) < 3
    offline = LLM(llama_dir, dtype="float32", max_batch_total_tokens=512).generate(
        [prompt], SamplingParams(max_new_tokens=40, watermark=True, do_sample=True, seed=5))[0]
    assert offline.token_ids == marked_ids
