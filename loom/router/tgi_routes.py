"""TGI's native API: /generate, /generate_stream, POST / (compat), /tokenize, /info, /health, /ping, /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loom import __version__
from loom.router.state import RouterState, parse_body
from loom.router.errors import IncompleteGenerationStreamError, InferError, ValidationError
from loom.router.generation import GenerationResult, StreamItem
from loom.router.handlers import (
    RequestLifecycle,
    body_schema,
    response_headers,
    sse_response,
    state_of,
    tokens_with_offsets,
    until_disconnected,
)
from loom.router.metrics import render
from loom.router.schemas import CompatGenerateRequest, GenerateRequest
from loom.router.response_schemas import (
    ERRORS,
    CompatGenerateResponse,
    ErrorResponse,
    Info,
    TokenizeResponse,
    json_doc,
    sse_doc,
)
from loom.router.schemas import GenerateResponse, StreamResponse
from loom.router.streams import compact, sse_data

logger = logging.getLogger(__name__)
router = APIRouter()
HEALTH_TIMEOUT_SECONDS = 10.0
TAGS = ["Text Generation Inference"]


# ---------------------------------------------------------------------------------------------------------------
# /generate and POST / (non-stream)


def details_dict(result: GenerationResult, best_of_sequences: list[dict] | None = None) -> dict:
    d = {
        "finish_reason": result.finish_reason,
        "generated_tokens": result.generated_tokens,
        "seed": result.seed,
        "prefill": result.prefill,
        "tokens": [t.as_dict() for t in result.tokens],
    }
    if best_of_sequences:
        d["best_of_sequences"] = best_of_sequences
    if result.top_tokens:
        d["top_tokens"] = [[t.as_dict() for t in step] for step in result.top_tokens]
    return d


async def generate_json(state: RouterState, body: GenerateRequest, full_text_default: bool) -> tuple[dict, dict]:
    """Validate, generate (`best_of` copies when asked, the best by mean logprob wins) and shape the response."""
    async with RequestLifecycle(state) as life:
        vreq = await life.validate(body.inputs, body.parameters, stream=False, full_text_default=full_text_default)
        results = await life.generate(vreq, vreq.best_of)
    best = max(results, key=lambda r: r.mean_logprob)
    response: dict = {"generated_text": best.generated_text}
    if vreq.details:
        others = [{"generated_text": r.generated_text, **details_dict(r)} for r in results if r is not best]
        response["details"] = details_dict(best, others)
    return response, response_headers([best], len(body.inputs))


@router.post("/generate", openapi_extra=body_schema(GenerateRequest), tags=TAGS,
             responses={200: json_doc(GenerateResponse, "Generated text"), **ERRORS})
async def generate(request: Request) -> Response:
    state = state_of(request)
    body = await parse_body(request, GenerateRequest)
    response, headers = await until_disconnected(request, state, generate_json(state, body, False))
    return JSONResponse(response, headers=headers)


# ---------------------------------------------------------------------------------------------------------------
# /generate_stream and POST / (stream)


def stream_event(index: int, item: StreamItem, details: bool) -> dict:
    event: dict = {"index": index, "token": item.token.as_dict()}
    if item.top_tokens:
        event["top_tokens"] = [t.as_dict() for t in item.top_tokens]
    r = item.result
    event["generated_text"] = r.generated_text if r is not None else None
    event["details"] = (
        {"finish_reason": r.finish_reason, "generated_tokens": r.generated_tokens, "seed": r.seed,
         "input_length": r.input_length}
        if r is not None and details else None
    )
    return event


async def native_stream(state: RouterState, body: GenerateRequest, full_text_default: bool) -> AsyncIterator[bytes]:
    """TGI streams every error inside the event stream (status 200, headers already sent)."""
    try:
        async with RequestLifecycle(state) as life:
            vreq = await life.validate(body.inputs, body.parameters, stream=True, full_text_default=full_text_default)
            index = 0
            async with aclosing(life.stream(vreq)) as items:
                async for item in items:
                    index += 1
                    yield sse_data(compact(stream_event(index, item, vreq.details)))
    except InferError as err:
        yield sse_data(compact(err.body()))
    except Exception:  # a bug (counted as incomplete): tell the client inside the stream, not by cutting it
        logger.exception("stream failed")
        yield sse_data(compact(IncompleteGenerationStreamError().body()))


@router.post("/generate_stream", openapi_extra=body_schema(GenerateRequest), tags=TAGS,
             responses={200: sse_doc(StreamResponse, "Generated tokens, one event each"), **ERRORS})
async def generate_stream(request: Request) -> Response:
    state = state_of(request)
    body = await parse_body(request, GenerateRequest)
    return sse_response(native_stream(state, body, full_text_default=False), len(body.inputs))


@router.post("/", openapi_extra=body_schema(CompatGenerateRequest), tags=TAGS, responses={
    200: json_doc(CompatGenerateResponse, "Generated text (an event stream of StreamResponse with stream: true)"),
    **ERRORS})
async def compat_generate(request: Request) -> Response:
    """The `text-generation` and `huggingface_hub` clients post here. Non-stream answers are a JSON array."""
    state = state_of(request)
    body = await parse_body(request, CompatGenerateRequest)
    # TGI: return_full_text defaults to true here when the hub pipeline tag is text-generation or unknown
    full_text = state.config.model_pipeline_tag in (None, "text-generation")
    if body.stream:
        return sse_response(native_stream(state, body, full_text_default=full_text), len(body.inputs))
    response, headers = await until_disconnected(request, state, generate_json(state, body, full_text))
    return JSONResponse([response], headers=headers)


# ---------------------------------------------------------------------------------------------------------------
# /tokenize, /info, /health, /ping, /metrics


@router.post("/tokenize", openapi_extra=body_schema(GenerateRequest), tags=TAGS,
             responses={200: json_doc(TokenizeResponse, "Tokens with offsets"), 422: ERRORS[422]})
async def tokenize(request: Request) -> Response:
    state = state_of(request)
    body = await parse_body(request, GenerateRequest)
    if not body.inputs:
        raise ValidationError("`inputs` cannot be empty")
    tokens = await asyncio.to_thread(
        tokens_with_offsets, state.tokenizer, body.inputs, truncate=body.parameters.truncate)
    return JSONResponse(tokens)


def info_dict(state: RouterState) -> dict:
    c = state.config
    return {
        "model_id": c.model_id, "model_sha": c.model_sha, "model_pipeline_tag": c.model_pipeline_tag,
        "max_concurrent_requests": c.max_concurrent_requests, "max_best_of": c.max_best_of,
        "max_stop_sequences": c.max_stop_sequences, "max_input_tokens": state.limits.max_input_tokens,
        "max_total_tokens": state.limits.max_total_tokens, "validation_workers": c.validation_workers,
        "max_client_batch_size": c.max_client_batch_size, "router": "text-generation-router",
        "version": __version__, "sha": None, "docker_label": None,
    }


@router.get("/info", tags=TAGS, responses={200: json_doc(Info, "Served model info")})
async def info(request: Request) -> JSONResponse:
    return JSONResponse(info_dict(state_of(request)))


async def health(request: Request) -> Response:
    """A real check: the engine answers between steps (and, after a failure, runs a one-token generation; when
    idle it checks its KV-cache integrity)."""
    state = state_of(request)
    unhealthy = JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
    if state.draining:
        return unhealthy
    try:
        report = await state.engine.health(HEALTH_TIMEOUT_SECONDS)
    except (TimeoutError, OSError):
        return unhealthy
    return Response(status_code=200) if report.ok else unhealthy


HEALTH_RESPONSES = {200: {"description": "Everything is working fine"},
                    503: json_doc(ErrorResponse, "Text generation inference is down")}
router.add_api_route("/health", health, methods=["GET"], tags=TAGS, responses=HEALTH_RESPONSES)
router.add_api_route("/ping", health, methods=["GET"], tags=TAGS, responses=HEALTH_RESPONSES)
router.add_api_route("/", health, methods=["GET"], tags=TAGS, name="health_root", responses=HEALTH_RESPONSES)


@router.get("/metrics", tags=TAGS, responses={200: {"description": "Prometheus metrics",
                                                 "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(render(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
