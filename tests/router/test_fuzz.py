"""Property-based fuzzing of every POST route of Loom's own OpenAPI document, in process (the fast slice; the long
run against a live server is scripts/fuzz.py, with the same strategies from loom.testing.fuzz).

Invariants: no 5xx, TGI's error shapes on every 4xx and inside streams, no leaked paths or stack traces, /health
stays 200 throughout, and the engine lives on with its KV cache intact."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings

from loom.router.app import create_app
from loom.router.config import RouterConfig
from loom.testing.fuzz import FuzzCase, FuzzLimits, cases, findings, post_routes, violations

FUZZED_ROUTES = ["/", "/chat_tokenize", "/generate", "/generate_stream", "/invocations", "/tokenize",
                 "/v1/chat/completions", "/v1/completions", "/vertex"]
EXAMPLES_PER_ROUTE = int(os.environ.get("LOOM_FUZZ_EXAMPLES", "80"))


@pytest.fixture(scope="module")
def fuzz_client(engine_server, llama_dir):
    config = RouterConfig(model_id="loom-test/tiny-llama", model_dir=str(llama_dir))
    app = create_app(config, engine_server.endpoint, connect_timeout=30)
    with TestClient(app, raise_server_exceptions=False) as client:  # a server error is a 500, as over HTTP
        yield client
    engine_server.engine.check_integrity()


@pytest.fixture(scope="module")
def openapi(fuzz_client) -> dict:
    r = fuzz_client.get("/api-doc/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def limits(fuzz_client) -> FuzzLimits:
    return FuzzLimits.from_info(fuzz_client.get("/info").json())


def test_every_post_route_of_the_document_is_fuzzed(openapi):
    assert sorted(post_routes(openapi)) == sorted(FUZZED_ROUTES)


def check(client: TestClient, engine_server, case: FuzzCase) -> None:
    headers = {"content-type": case.content_type} if case.content_type is not None else {}
    r = client.post(case.path, content=case.body, headers=headers)
    problems = violations(r.status_code, r.headers.get("content-type", ""), r.content, case.body, case.path)
    assert not problems, f"{case.describe()}\n -> {problems}"
    assert engine_server.healthy, f"an engine step failed after {case.describe()}"  # before /health's probe resets it
    health = client.get("/health")
    assert health.status_code == 200, f"/health {health.status_code} after {case.describe()}"


@pytest.mark.parametrize("path", FUZZED_ROUTES)
def test_fuzz_route(fuzz_client, openapi, limits, engine_server, path):
    schema = post_routes(openapi)[path]
    assert fuzz_client.get("/health").status_code == 200  # an earlier test's engine failure is behind us
    for body in findings(schema):  # what fuzzing found before, first
        check(fuzz_client, engine_server, FuzzCase(path, body, kind="finding"))

    # no shrinking: a failure reports its request as generated, at once, rather than minutes later
    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases(path, schema, limits))
    def run(case: FuzzCase) -> None:
        check(fuzz_client, engine_server, case)

    run()
