"""TGI's native routes against a real engine: shapes, SSE framing, validation messages, limits."""

from __future__ import annotations

import json
import math

import pytest

from loom import LLM, SamplingParams


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return [chunk for chunk in text.split("\n\n") if chunk]


def test_generate_greedy_matches_offline_llm(client, llama_dir):
    r = client.post("/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 12,
                                                                               "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    offline = LLM(llama_dir, dtype="float32", max_batch_total_tokens=512).generate(
        ["Hello world"], SamplingParams(max_new_tokens=12))[0]
    assert body["generated_text"] == offline.text
    d = body["details"]
    assert [t["id"] for t in d["tokens"]] == offline.token_ids
    assert d["finish_reason"] == offline.finish_reason and d["generated_tokens"] == len(offline.token_ids)
    assert d["seed"] is None and d["prefill"] == []
    assert list(d) == ["finish_reason", "generated_tokens", "seed", "prefill", "tokens"]
    assert r.headers["x-generated-tokens"] == str(len(offline.token_ids))


def test_stream_framing_and_text_equals_non_stream(client):
    params = {"max_new_tokens": 10, "details": True}
    full = client.post("/generate", json={"inputs": "The cat", "parameters": params}).json()
    r = client.post("/generate_stream", json={"inputs": "The cat", "parameters": params})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(e.startswith("data:{") for e in events)  # no space after the colon, no [DONE]
    parsed = [json.loads(e[5:]) for e in events]
    assert [p["index"] for p in parsed] == list(range(1, len(parsed) + 1))
    assert all(p["generated_text"] is None and p["details"] is None for p in parsed[:-1])
    assert parsed[-1]["generated_text"] == full["generated_text"]
    assert "".join(p["token"]["text"] for p in parsed) == full["generated_text"]
    assert parsed[-1]["details"] == {"finish_reason": full["details"]["finish_reason"],
                                     "generated_tokens": 10, "seed": None, "input_length": 2}
    assert list(parsed[0]) == ["index", "token", "generated_text", "details"]


@pytest.mark.parametrize("params, message", [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"repetition_penalty": -1}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 511. Given: 0"),
    ({"max_new_tokens": 600}, "`inputs` tokens + `max_new_tokens` must be <= 512. Given: 2 `inputs` tokens and 600 `max_new_tokens`"),
])
def test_validation_errors_have_tgi_messages(client, params, message):
    r = client.post("/generate", json={"inputs": "Hello world", "parameters": params})
    assert r.status_code == 422
    assert r.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_empty_inputs_and_bad_bodies(client):
    r = client.post("/generate", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422 and r.json()["error"] == "Input validation error: `inputs` cannot be empty"
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/plain")
    r = client.post("/generate", content=b'{"inputs": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and "Failed to deserialize the JSON body" in r.text


@pytest.mark.parametrize("raw", [
    b'{"inputs": "a", "parameters": {"temperature": NaN}}',
    b'{"inputs": "a", "parameters": {"top_k": Infinity}}',
    b'{"inputs": "a", "parameters": {"repetition_penalty": 1e999}}',
    b'{"inputs": "\\ud800"}',  # a lone surrogate escape
    b'{"inputs": "a", "parameters": {"stop": ["\xed\xa0\x80"]}}',  # ... and as (invalid) UTF-8 bytes
    b'{"inputs": "\xff"}',
    b'{"inputs": "a", "x": ' + b"[" * 127 + b"]" * 127 + b"}",  # 128 levels: past serde_json's limit
    b"[" * 100_000 + b"]" * 100_000,  # past Python's recursion limit
], ids=["nan", "infinity", "out-of-range", "surrogate-escape", "surrogate-bytes", "utf8", "depth-128", "depth-1e5"])
def test_json_that_serde_rejects_is_a_400(client, raw):
    """Found by fuzzing (tests/router/test_fuzz.py): Python's json accepted these, and a NaN temperature ran, a
    surrogate stop sequence or a deep body made a 500."""
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("Failed to parse the request body as JSON: ")


def test_json_that_serde_accepts_still_parses(client):
    raw = b'{"inputs": "\\ud83d\\ude00 ok", "parameters": {"max_new_tokens": 1}, "x": ' + b"[" * 126 + \
        b"]" * 126 + b"}"
    assert client.post("/generate", content=raw, headers={"content-type": "application/json"}).status_code == 200
    deep = "[" * 100_000 + "]" * 100_000  # a grammar string is read the same way: a 422, not a 500
    r = client.post("/generate", json={"inputs": "a", "parameters": {"grammar": {"type": "json", "value": deep}}})
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error: grammar is not valid: recursion limit exceeded",
                        "error_type": "validation"}

@pytest.mark.parametrize("params", [{"top_k": 10**30}, {"top_k": 2**31}, {"top_k": -(2**31) - 1},
                                    {"best_of": 2**64}, {"truncate": 2**64}])
def test_integers_wider_than_tgi_types_are_rejected(client, params):
    """Found by fuzzing: top_k 10**30 passed validation and overflowed the engine message's encoding (500)."""
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 1, **params}})
    assert r.status_code == 422, r.text
    assert r.text.startswith("Failed to deserialize the JSON body into the target type: parameters.")

def test_non_finite_logprobs_are_null(client):
    """Found by fuzzing: a tiny temperature gave -inf logprobs, which made the JSON encoder fail (500, or an
    "Incomplete generation stream" event). TGI's serde_json writes non-finite floats as null. (The sampler now takes
    the t → 0 limit for such temperatures, logprob 0; the writer still never emits a non-finite number.)"""
    from loom.router.generation import _json_float

    assert [_json_float(x) for x in (float("-inf"), float("inf"), float("nan"), -1.5)] == [None, None, None, -1.5]
    params = {"max_new_tokens": 2, "temperature": 1e-38, "details": True, "top_n_tokens": 3}
    r = client.post("/generate", json={"inputs": "Hello", "parameters": params})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    logprobs = [t["logprob"] for t in d["tokens"]] + [t["logprob"] for step in d["top_tokens"] for t in step]
    assert all(lp is None or math.isfinite(lp) for lp in logprobs)
    r = client.post("/generate_stream", json={"inputs": "Hello", "parameters": params})
    events = [json.loads(e[5:]) for e in sse_events(r.text)]
    assert len(events) == 2 and all("error" not in e for e in events)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                  "temperature": 1e-38, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text

def test_errors_inside_the_stream_keep_status_200(client):
    r = client.post("/generate_stream", json={"inputs": "Hi", "parameters": {"temperature": -1}})
    assert r.status_code == 200
    assert sse_events(r.text) == [
        'data:{"error":"Input validation error: `temperature` must be strictly positive","error_type":"validation"}'
    ]


def test_compat_route_returns_a_list_and_full_text(client):
    r = client.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body, list) and body[0]["generated_text"].startswith("Hello")
    r = client.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")


def test_absent_parameters_mean_sampling_with_a_seed(client):
    r = client.post("/generate", json={"inputs": "Hello"})
    assert r.status_code == 200
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"details": True, "do_sample": True,
                                                                          "max_new_tokens": 4}})
    assert isinstance(r.json()["details"]["seed"], int)


def test_top_n_tokens_and_best_of(client):
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {
        "max_new_tokens": 4, "details": True, "top_n_tokens": 2}})
    d = r.json()["details"]
    assert len(d["top_tokens"]) == 4 and all(len(step) >= 2 for step in d["top_tokens"])
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {
        "max_new_tokens": 4, "details": True, "best_of": 2, "do_sample": True}})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    assert len(d["best_of_sequences"]) == 1
    assert r.json()["generated_text"] != "" or d["best_of_sequences"][0]["generated_text"] is not None
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"best_of": 3, "do_sample": True}})
    assert r.status_code == 422 and "`best_of` must be > 0 and <= 2. Given: 3" in r.json()["error"]


def test_tokenize_info_health_models_metrics(client):
    toks = client.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["text"] for t in toks] == ["Hello", " world"]
    assert toks[1]["start"] == 5 and toks[1]["stop"] == 11
    info = client.get("/info").json()
    assert info["model_id"] == "loom-test/tiny-llama" and info["max_total_tokens"] == 512
    assert info["max_input_tokens"] == 511 and info["router"] == "text-generation-router"
    assert client.get("/health").status_code == 200
    assert client.get("/ping").status_code == 200
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "loom-test/tiny-llama"
    client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    text = client.get("/metrics").text
    for name in ("tgi_request_count", "tgi_request_success", "tgi_batch_inference_count", "tgi_queue_size",
                 "tgi_request_duration_bucket", "tgi_batch_max_total_tokens"):
        assert name in text


def test_api_key(make_client):
    c = make_client(api_key="secret")
    assert c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}).status_code == 401
    r = c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
               headers={"Authorization": "bearer SECRET"})
    assert r.status_code == 200  # TGI compares case-insensitively
    assert c.get("/health").status_code == 200  # open route


def test_payload_limit(make_client):
    c = make_client(payload_limit=100)
    r = c.post("/generate", json={"inputs": "x" * 200})
    assert r.status_code == 413


def test_cors_and_openapi(make_client):
    c = make_client(cors_allow_origin=("https://app.example",))
    r = c.options("/generate", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = c.options("/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    spec = c.get("/api-doc/openapi.json").json()
    assert "/generate" in spec["paths"] and "/generate_stream" in spec["paths"]
    assert c.get("/docs").status_code == 200


def test_decoder_input_details_and_truncate(make_client):
    c = make_client(enable_prefill_logprobs=True)
    r = c.post("/generate", json={"inputs": "Hello big world", "parameters": {
        "max_new_tokens": 2, "decoder_input_details": True}})
    d = r.json()["details"]  # decoder_input_details implies details
    prefill = d["prefill"]
    assert [p["text"] for p in prefill] == ["Hello", " big", " world"]
    assert prefill[0]["logprob"] is None and all(p["logprob"] < 0 for p in prefill[1:])
    assert list(prefill[0]) == ["id", "text", "logprob"]
    r = c.post("/generate_stream", json={"inputs": "Hello big world", "parameters": {
        "max_new_tokens": 2, "truncate": 2, "details": True}})
    last = json.loads(sse_events(r.text)[-1][5:])
    assert last["details"]["input_length"] == 2
    r = c.post("/generate_stream", json={"inputs": "Hi", "parameters": {"decoder_input_details": True}})
    assert "`decoder_input_details` == true is not supported when streaming tokens" in r.text


def test_prefill_logprobs_are_off_unless_enabled(client):
    r = client.post("/generate", json={"inputs": "Hello big world", "parameters": {
        "max_new_tokens": 2, "decoder_input_details": True}})
    assert r.json()["details"]["prefill"] == []


def test_metrics_use_tgi_names(client):
    client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    client.post("/generate", json={"inputs": "Hello", "parameters": {"temperature": 0}})
    text = client.get("/metrics").text
    lines = text.splitlines()
    assert "# TYPE tgi_request_count counter" in lines
    assert any(ln.startswith("tgi_request_count ") for ln in lines)
    assert any(ln.startswith('tgi_request_failure{err="validation"} ') for ln in lines)
    names = {ln.split(" ")[0].split("{")[0] for ln in lines if not ln.startswith("#")}
    assert not any(n.endswith("_total") or n.endswith("_created") for n in names)
    for name in ("tgi_request_duration_bucket", "tgi_request_queue_duration_count", "tgi_batch_current_size",
                 "tgi_queue_size", "tgi_request_input_length_bucket", 'tgi_batch_inference_count{method="'):
        assert any(ln.startswith(name) for ln in lines), name
