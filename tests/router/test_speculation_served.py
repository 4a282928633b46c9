"""Speculative decoding behind the router: one stream event per token even when a step accepts several, the same
tokens as without speculation, and the speculation metrics in /metrics."""

from __future__ import annotations

import json
import re
import threading
import uuid

import pytest
from fastapi.testclient import TestClient

from loom import LLM, SamplingParams
from loom.config import EngineConfig
from loom.engine.core import EngineCore
from loom.engine.server import EngineServer
from loom.router.app import create_app
from loom.router.config import RouterConfig
from loom.testing.speculation import OracleProposer

VOCAB = 50257


@pytest.fixture(scope="module")
def prompts_and_expected(llama_dir):
    prompts = ["The quick brown fox jumps over the lazy dog", "Speculative decoding verifies drafts in one pass"]
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=2048)
    results = llm.generate(prompts, SamplingParams(max_new_tokens=24))
    return prompts, results


@pytest.fixture(scope="module")
def client(llama_dir, prompts_and_expected, tmp_path_factory):
    prompts, results = prompts_and_expected
    engine = EngineCore(llama_dir, "float32", EngineConfig(max_batch_total_tokens=2048, max_total_tokens=512,
                                                           speculate=3))
    assert engine.speculator is not None
    engine.speculator.cost = None
    references = [r.prompt_token_ids + r.token_ids for r in results]
    engine.speculator.proposer = OracleProposer(references, VOCAB, 0.3)
    endpoint = f"ipc://{tmp_path_factory.mktemp('ipc')}/loom-spec-{uuid.uuid4().hex[:8]}"
    server = EngineServer(engine, endpoint)
    thread = threading.Thread(target=server.run, name="engine-spec", daemon=True)
    thread.start()
    config = RouterConfig(model_id="loom-test/tiny-llama", model_dir=str(llama_dir))
    with TestClient(create_app(config, endpoint, connect_timeout=30)) as c:
        yield c
    server.stop()
    thread.join(timeout=5)
    engine.check_integrity()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_stream_has_one_event_per_token_and_the_tokens_without_speculation(client, prompts_and_expected):
    prompts, results = prompts_and_expected
    for prompt, expected in zip(prompts, results):
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, "details": True}}
        events = []
        with client.stream("POST", "/generate_stream", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        assert [e["index"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["details"]["generated_tokens"] == len(events) == 24
        assert [e["token"]["id"] for e in events] == expected.token_ids
        plain = client.post("/generate", json=body).json()
        assert [t["id"] for t in plain["details"]["tokens"]] == expected.token_ids


def test_metrics_report_accepted_drafts(client):
    text = client.get("/metrics").text
    drafted = _metric(text, "loom_spec_decode_draft_tokens")
    accepted = _metric(text, "loom_spec_decode_accepted_tokens")
    assert 0 < accepted < drafted
    assert _metric(text, "loom_spec_decode_acceptance_rate") == pytest.approx(accepted / drafted)
    # TGI's histogram: tokens beyond the first per request and step; some steps accepted drafts
    assert _metric(text, "tgi_request_skipped_tokens_sum") > 0
    assert _metric(text, "tgi_request_skipped_tokens_count") > 0
