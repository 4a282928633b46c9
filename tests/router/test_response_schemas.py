"""The HTTP contract as types: /api-doc/openapi.json documents a response for every route, and every golden snapshot
(tests/router/snapshots/) validates against the model its route declares (router/response_schemas.py, extra fields
forbidden), so the documented types and the bytes on the wire cannot drift apart."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, TypeAdapter

from loom.router.app import create_app
from loom.router.config import RouterConfig
from loom.router.response_schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatTokenizeResponse,
    Completion,
    CompatGenerateResponse,
    ErrorResponse,
    Info,
    ModelList,
    OpenAIStreamError,
    TokenizeResponse,
    VertexResponse,
)
from loom.router.schemas import GenerateResponse, StreamResponse

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(RouterConfig(model_id="m", model_dir="unused"), "ipc:///nonexistent").openapi()


def test_every_route_documents_its_success_response(openapi):
    undocumented = []
    for path, methods in openapi["paths"].items():
        for method, op in methods.items():
            ok = op.get("responses", {}).get("200", {})
            if not ok.get("description") or ok.get("description") == "Successful Response":
                undocumented.append(f"{method.upper()} {path}")
    assert not undocumented, f"routes without a documented 200 response: {undocumented}"
    gen = openapi["paths"]["/generate"]["post"]["responses"]
    assert gen["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateResponse"}
    assert gen["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "text/event-stream" in openapi["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]


def test_every_reference_in_the_document_resolves(openapi):
    text = json.dumps(openapi)
    assert "#/$defs/" not in text  # a model's own definitions do not exist at the document's root
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))
    assert refs <= set(openapi["components"]["schemas"]), refs - set(openapi["components"]["schemas"])
    body = openapi["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "inputs" in body["properties"] and "parameters" in body["properties"]


def _model_for(request: dict, status: int, sse: bool) -> type[BaseModel] | TypeAdapter | None:
    path, body = request["path"], request.get("json") or {}
    if status != 200:
        return ErrorResponse
    if path == "/invocations":
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions" if "prompt" in body else "/"
    stream = sse or bool(body.get("stream"))
    return {
        ("/generate", False): GenerateResponse, ("/generate_stream", True): StreamResponse,
        ("/", False): CompatGenerateResponse, ("/", True): StreamResponse,
        ("/v1/chat/completions", False): ChatCompletion, ("/v1/chat/completions", True): ChatCompletionChunk,
        ("/v1/completions", False): Completion, ("/v1/completions", True): Completion,
        ("/tokenize", False): TokenizeResponse, ("/chat_tokenize", False): ChatTokenizeResponse,
        ("/info", False): Info, ("/v1/models", False): ModelList, ("/vertex", False): VertexResponse,
    }.get((path, stream))


def _has_json_body(case: dict) -> bool:
    """Plain-text and empty bodies, /metrics and the framework's own 404/405 have no declared JSON model."""
    response = case["response"]
    return (response.get("body_format") not in ("empty", "text") and case["request"]["path"] != "/metrics"
            and response["status"] not in (404, 405))


def _cases() -> list[Path]:
    return sorted(p for p in SNAPSHOTS.glob("*.json")
                  if p.name != "route_table.json" and _has_json_body(json.loads(p.read_text())))


@pytest.mark.parametrize("snapshot", _cases(), ids=lambda p: p.stem)
def test_snapshot_matches_its_declared_model(snapshot):
    case = json.loads(snapshot.read_text())
    request, response = case["request"], case["response"]
    sse = response.get("body_format") == "sse"
    model = _model_for(request, response["status"], sse)
    assert model is not None, f"no declared model for {request['method']} {request['path']}"
    bodies = response["events"] if sse else [response["body"]]
    for body in bodies:
        if sse and "error" in body:  # errors inside a stream: TGI's body, or its OpenAI shape on OpenAI routes
            openai = request["path"].startswith("/v1/") or "messages" in (request.get("json") or {})
            (OpenAIStreamError if openai else ErrorResponse).model_validate(body)
            continue
        body = json.loads(json.dumps(body).replace('"<unix-time>"', "0"))  # the snapshots' placeholder
        model.model_validate(body)
