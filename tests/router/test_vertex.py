"""POST /vertex as TGI serves it (router/src/vertex.rs): generate and chat instances, TGI's 422/500 bodies, metrics."""

from __future__ import annotations

import re

HELLO = [{"role": "user", "content": "Hello"}]
INCOMPLETE = {"error": "Incomplete generation", "error_type": "Incomplete generation"}


def request_count(client) -> float:
    return float(re.search(r"^tgi_request_count (\S+)$", client.get("/metrics").text, re.M).group(1))


def test_generate_instances_sample_with_only_max_new_tokens_and_seed(client):
    # every other parameter is ignored, as in TGI: the instance always samples
    instance = {"inputs": "Hello world", "parameters": {"max_new_tokens": 4, "seed": 7, "temperature": 0.01,
                                                        "top_k": 1, "stop": ["a"], "details": False}}
    r = client.post("/vertex", json={"instances": [instance, instance, {"inputs": "The cat"}]})
    assert r.status_code == 200, r.text
    assert list(r.json()) == ["predictions"]
    first, second, third = r.json()["predictions"]
    same = client.post("/generate", json={"inputs": "Hello world", "parameters": {
        "do_sample": True, "seed": 7, "max_new_tokens": 4}}).json()["generated_text"]
    assert first == second == same
    assert isinstance(third, str)


def test_chat_instances_are_templated_like_chat_completions(client):
    chat = {"messages": HELLO, "max_tokens": 3, "temperature": 0}
    r = client.post("/vertex", json={"instances": [chat, {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}]})
    assert r.status_code == 200, r.text
    expected = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    assert r.json()["predictions"][0] == expected


def test_errors_have_tgi_bodies(client):
    r = client.post("/vertex", json={"instances": []})
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error", "error_type": "Input validation error"}
    # any failing instance fails the request with a 500, validation errors included (TGI maps every error so)
    r = client.post("/vertex", json={"instances": [{"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
                                                   {"inputs": "", "parameters": {"max_new_tokens": 1}}]})
    assert r.status_code == 500 and r.json() == INCOMPLETE
    r = client.post("/vertex", json={"instances": [{"inputs": "Hi", "parameters": {"max_new_tokens": 0}}]})
    assert r.status_code == 500 and r.json() == INCOMPLETE
    # a chat instance's template and tool errors come first, with their own status
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    r = client.post("/vertex", json={"instances": [{"messages": HELLO, "tools": [tool], "tool_choice": "nope"}]})
    assert r.status_code == 422
    assert r.json() == {"error": "Tool error: Tool with name nope not found", "error_type": "tool_error"}
    r = client.post("/vertex", json={"instances": [{"neither": 1}]})
    assert r.status_code == 422 and r.text.startswith("Failed to deserialize the JSON body into the target type")
    r = client.post("/vertex", json={"instances": "x"})
    assert r.status_code == 422


def test_metrics_count_the_route_and_each_instance(client):
    before = request_count(client)
    body = {"instances": [{"inputs": "Hi", "parameters": {"max_new_tokens": 1}}] * 2}
    assert client.post("/vertex", json=body).status_code == 200
    assert request_count(client) == before + 3
    assert client.post("/vertex", json={"instances": []}).status_code == 422
    assert request_count(client) == before + 4


def test_documented_and_protected(make_client):
    c = make_client(api_key="k")
    doc = c.get("/api-doc/openapi.json").json()["paths"]["/vertex"]["post"]
    assert "instances" in doc["requestBody"]["content"]["application/json"]["schema"]["properties"]
    body = {"instances": [{"inputs": "Hi", "parameters": {"max_new_tokens": 1}}]}
    assert c.post("/vertex", json=body).status_code == 401
    r = c.post("/vertex", json=body, headers={"authorization": "Bearer k"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
