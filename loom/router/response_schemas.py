"""The HTTP responses as types: every route's body (and every SSE event's JSON) as a pydantic model, in TGI's
field order. Routes declare them (`responses=` in their decorators) so `/api-doc/openapi.json` documents each
response, and tests/router/test_response_schemas.py validates every golden snapshot's body against the model its
route declares (`extra="forbid"`: a field the model does not name fails), so documentation and wire cannot drift
apart. The bodies themselves are still written by the routes, not serialized from these models: key order and
which keys are present are part of TGI's wire format, and the golden snapshots pin those bytes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, RootModel

from loom.router.schemas import GenerateResponse


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(_Strict):
    """TGI's error body (router/src/infer/mod.rs::InferError), for 4xx/5xx and inside streams."""

    error: str
    error_type: str


class OpenAIStreamErrorDetail(_Strict):
    message: str
    http_status_code: int


class OpenAIStreamError(_Strict):
    """An error inside an OpenAI event stream (TGI reports every kind with status 422 there)."""

    error: OpenAIStreamErrorDetail


class CompatGenerateResponse(RootModel[list[GenerateResponse]]):
    """`POST /` without streaming: the `/generate` body in a one-element array."""


class Info(_Strict):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None


class SimpleToken(_Strict):
    id: int
    text: str
    start: int
    stop: int


class TokenizeResponse(RootModel[list[SimpleToken]]):
    """`/tokenize`: each token with the input text it covers and its byte offsets."""


class ChatTokenizeResponse(_Strict):
    tokenize_response: list[SimpleToken]
    templated_text: str


class Model(_Strict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Strict):
    object: Literal["list"]
    data: list[Model]


class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Strict):
    token: str
    logprob: float


class TokenLogprob(_Strict):
    token: str
    logprob: float
    top_logprobs: list[TopLogprob]


class Logprobs(_Strict):
    content: list[TokenLogprob]


class FunctionCall(_Strict):
    description: str | None = None
    name: str | None = None
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(_Strict):
    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Strict):
    index: int
    message: ChatMessage
    logprobs: Logprobs | None
    finish_reason: str | None


class ChatCompletion(_Strict):
    object: Literal["chat.completion"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Strict):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Strict):
    index: int
    delta: ChatDelta
    logprobs: Logprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Strict):
    """One `data:` event of a streamed chat completion (the last one, with `include_usage`, has no choices)."""

    object: Literal["chat.completion.chunk"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None


class CompletionChoice(_Strict):
    index: int
    text: str
    logprobs: Any | None  # always null: Loom, like TGI, does not return completion logprobs
    finish_reason: str


class Completion(_Strict):
    """`/v1/completions`, and each `data:` event of its stream (the last event of a prompt carries its usage)."""

    object: Literal["text_completion"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class VertexResponse(_Strict):
    """`POST /vertex`: one generated text per instance, in order."""

    predictions: list[str]


def json_doc(model: type[BaseModel], description: str) -> dict:
    return {"model": model, "description": description}


def inline_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its `$defs` references inlined: schemas placed by hand in the OpenAPI document
    (request bodies parsed by the routes themselves, event streams) cannot point into the model's own `$defs`,
    and FastAPI registers component schemas only for the models it handles. Recursive models keep a reference."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name in seen:  # recursion: a JSON value type and the like
                    return {}
                return inline(defs[name], (*seen, name))
            # a discriminator's mapping names $defs entries; with them inlined, the property name alone remains
            return {k: ({"propertyName": v["propertyName"]} if k == "discriminator" and isinstance(v, dict)
                        else inline(v, seen)) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v, seen) for v in node]
        return node

    return inline(schema, ())


def sse_doc(model: type[BaseModel], description: str) -> dict:
    """A `text/event-stream` response whose `data:` events are `model` (errors: `ErrorResponse` events)."""
    return {"description": description, "content": {"text/event-stream": {"schema": inline_schema(model)}}}


ERRORS = {
    422: json_doc(ErrorResponse, "Input validation error"),
    424: json_doc(ErrorResponse, "Generation error"),
    429: json_doc(ErrorResponse, "Model is overloaded"),
    500: json_doc(ErrorResponse, "Incomplete generation"),
}
