"""`loom launch --speculate` and `--draft-model-id` end to end: the flags reach the engine, and a request's tokens
and the speculation metrics come back through the router."""

from __future__ import annotations

import re

import requests


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_draft_model_flag_serves_the_same_tokens(launch, llama_dir):
    plain = launch()
    body = {"inputs": "one two three four five six seven eight", "parameters": {"max_new_tokens": 24,
                                                                                "details": True}}
    expected = requests.post(f"{plain.url}/generate", json=body, timeout=60).json()
    plain.stop()
    # the tiny model as its own draft: every draft the cost model keeps is accepted
    server = launch("--draft-model-id", str(llama_dir), "--speculate", "3")
    got = requests.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert got["generated_text"] == expected["generated_text"]
    assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in expected["details"]["tokens"]]
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    drafted = _metric(text, "loom_spec_decode_draft_tokens")
    assert drafted > 0 and _metric(text, "loom_spec_decode_accepted_tokens") == drafted
    assert "draft model" in server.logs()
