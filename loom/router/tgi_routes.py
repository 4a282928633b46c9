"""TGI's native API: /generate, /generate_stream, POST / (compat), /tokenize, /info, /health, /ping, /metrics."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loom import __version__
from loom.router.app import RouterState, parse_body
from loom.router.errors import InferError, UnavailableError, ValidationError
from loom.router.generation import GenerationResult, StreamItem, Timings
from loom.router.schemas import CompatGenerateRequest, GenerateRequest
from loom.router.streams import SSE_HEADERS, compact, sse_data, with_keepalive
from loom.router.validation import ValidatedRequest, validate

router = APIRouter()
HEALTH_TIMEOUT_SECONDS = 10.0
DISCONNECT_POLL_SECONDS = 0.5


def _state(request: Request) -> RouterState:
    return request.app.state.loom


def compute_type() -> str:
    return os.environ.get("COMPUTE_TYPE", "cpu")


def _schema(model) -> dict:
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}}


async def _validated(state: RouterState, body: GenerateRequest, stream: bool, full_text_default: bool = False):
    state.metrics.request_count.inc()
    if state.draining:
        raise UnavailableError("Server is shutting down")
    try:
        vreq = await validate(body.inputs, body.parameters, state.tokenizer, state.limits, stream=stream,
                              return_full_text_default=full_text_default)
    except ValidationError:
        state.metrics.request_failure.labels("validation").inc()
        raise
    state.metrics.input_length.observe(vreq.input_length)
    state.metrics.max_new_tokens.observe(vreq.params.max_new_tokens or 0)
    return vreq


def _record_success(state: RouterState, result: GenerationResult) -> None:
    m, t = state.metrics, result.timings
    m.request_success.inc()
    m.request_duration.observe(t.total)
    m.validation_duration.observe(t.validation)
    m.queue_duration.observe(t.queue)
    m.inference_duration.observe(t.inference)
    m.time_per_token.observe(t.inference / max(result.generated_tokens, 1))
    m.generated_tokens.observe(result.generated_tokens)


def _failure_label(err: InferError) -> str:
    return {"validation": "validation", "overloaded": "overloaded", "generation": "generation"}.get(
        err.error_type, "incomplete")


# ---------------------------------------------------------------------------------------------------------------
# /generate


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


def _best_of_sequence(result: GenerationResult) -> dict:
    seq = {k: v for k, v in details_dict(result).items()}
    return {"generated_text": result.generated_text, **seq}


def response_headers(results: list[GenerationResult], inputs: str) -> dict[str, str]:
    t = results[0].timings
    tokens = sum(r.generated_tokens for r in results)
    ms = lambda s: str(int(s * 1000))  # noqa: E731
    return {
        "x-compute-type": compute_type(),
        "x-compute-time": f"{t.total}",
        "x-compute-characters": str(len(inputs)),
        "x-total-time": ms(t.total),
        "x-validation-time": ms(t.validation),
        "x-queue-time": ms(t.queue),
        "x-inference-time": ms(t.inference),
        "x-time-per-token": ms(t.inference / max(tokens, 1)),
        "x-prompt-tokens": str(sum(r.input_length for r in results)),
        "x-generated-tokens": str(tokens),
    }


async def run_generate(state: RouterState, vreq: ValidatedRequest, timings: Timings) -> tuple[dict, GenerationResult]:
    """Generate (best_of copies when asked) and shape TGI's GenerateResponse."""
    if vreq.best_of > 1:
        if vreq.best_of > state.limits.max_best_of:
            raise ValidationError(
                f"`best_of` must be > 0 and <= {state.limits.max_best_of}. Given: {vreq.best_of}")
        with state.permit(vreq.best_of):
            results = await asyncio.gather(*(state.generator.generate(vreq, Timings(timings.start, timings.validated))
                                             for _ in range(vreq.best_of)))
        best = max(results, key=lambda r: r.mean_logprob)
        others = [_best_of_sequence(r) for r in results if r is not best]
    else:
        with state.permit():
            best = await state.generator.generate(vreq, timings)
        others = None
    body: dict = {"generated_text": best.generated_text}
    if vreq.details:
        body["details"] = details_dict(best, others)
    return body, best


async def _generate_json(state: RouterState, body: GenerateRequest, full_text_default: bool) -> tuple[dict, dict]:
    timings = Timings()
    try:
        vreq = await _validated(state, body, stream=False, full_text_default=full_text_default)
        timings.validated = time.monotonic()
        response, result = await run_generate(state, vreq, timings)
    except InferError as err:
        if err.error_type != "validation" and err.error_type != "overloaded":
            state.metrics.request_failure.labels(_failure_label(err)).inc()
        raise
    _record_success(state, result)
    return response, response_headers([result], body.inputs)


async def until_disconnected(request: Request, state: RouterState, work):
    """Await `work`, cancelling it if the client disconnects first (its engine requests are then aborted and
    their KV blocks freed). Uvicorn does not cancel non-streaming handlers by itself."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                state.metrics.request_failure.labels("dropped").inc()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


@router.post("/generate", openapi_extra=_schema(GenerateRequest), tags=["Text Generation Inference"])
async def generate(request: Request) -> Response:
    state = _state(request)
    body = await parse_body(request, GenerateRequest)
    response, headers = await until_disconnected(request, state, _generate_json(state, body, False))
    return JSONResponse(response, headers=headers)


# ---------------------------------------------------------------------------------------------------------------
# /generate_stream


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
    timings = Timings()
    try:
        vreq = await _validated(state, body, stream=True, full_text_default=full_text_default)
        timings.validated = time.monotonic()
        with state.permit():
            async with aclosing(state.generator.stream(vreq, timings)) as items:
                index = 0
                async for item in items:
                    index += 1
                    yield sse_data(compact(stream_event(index, item, vreq.details)))
                    if item.result is not None:
                        _record_success(state, item.result)
    except InferError as err:
        if err.error_type not in ("validation", "overloaded"):
            state.metrics.request_failure.labels(_failure_label(err)).inc()
        yield sse_data(compact(err.body()))
    except (GeneratorExit, asyncio.CancelledError):
        state.metrics.request_failure.labels("dropped").inc()  # client went away; the engine aborts it
        raise


def sse_response(events: AsyncIterator[bytes], inputs: str) -> StreamingResponse:
    headers = {**SSE_HEADERS, "x-compute-type": compute_type(), "x-compute-characters": str(len(inputs))}
    return StreamingResponse(with_keepalive(events), media_type="text/event-stream", headers=headers)


@router.post("/generate_stream", openapi_extra=_schema(GenerateRequest), tags=["Text Generation Inference"])
async def generate_stream(request: Request) -> Response:
    state = _state(request)
    body = await parse_body(request, GenerateRequest)
    return sse_response(native_stream(state, body, full_text_default=False), body.inputs)


@router.post("/", openapi_extra=_schema(CompatGenerateRequest), tags=["Text Generation Inference"])
async def compat_generate(request: Request) -> Response:
    """The `text-generation` and `huggingface_hub` clients post here. Non-stream answers are a JSON array."""
    state = _state(request)
    body = await parse_body(request, CompatGenerateRequest)
    # TGI: return_full_text defaults to true here when the hub pipeline tag is text-generation or unknown
    full_text = state.config.model_pipeline_tag in (None, "text-generation")
    if body.stream:
        return sse_response(native_stream(state, body, full_text_default=full_text), body.inputs)
    response, headers = await until_disconnected(request, state, _generate_json(state, body, full_text))
    return JSONResponse([response], headers=headers)


# ---------------------------------------------------------------------------------------------------------------
# /tokenize, /info, /health, /ping, /metrics


@router.post("/tokenize", openapi_extra=_schema(GenerateRequest), tags=["Text Generation Inference"])
async def tokenize(request: Request) -> Response:
    state = _state(request)
    body = await parse_body(request, GenerateRequest)
    if not body.inputs:
        raise ValidationError("`inputs` cannot be empty")
    enc = await asyncio.to_thread(state.tokenizer, body.inputs, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    truncate = body.parameters.truncate
    if truncate:
        ids, offsets = ids[-truncate:], offsets[-truncate:]
    data = body.inputs.encode()
    byte_at = _char_to_byte_offsets(body.inputs)
    out = []
    for tid, (start, stop) in zip(ids, offsets):
        b0, b1 = byte_at[start], byte_at[stop]
        out.append({"id": tid, "text": data[b0:b1].decode(errors="replace"), "start": b0, "stop": b1})
    return JSONResponse(out)


def _char_to_byte_offsets(text: str) -> list[int]:
    offsets, pos = [0], 0
    for ch in text:
        pos += len(ch.encode())
        offsets.append(pos)
    return offsets


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


@router.get("/info", tags=["Text Generation Inference"])
async def info(request: Request) -> JSONResponse:
    return JSONResponse(info_dict(_state(request)))


async def _health(request: Request) -> Response:
    state = _state(request)
    unhealthy = JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
    if state.draining:
        return unhealthy
    try:
        report = await state.engine.health(HEALTH_TIMEOUT_SECONDS)
    except (asyncio.TimeoutError, OSError):
        return unhealthy
    return Response(status_code=200) if report.ok else unhealthy


router.add_api_route("/health", _health, methods=["GET"], tags=["Text Generation Inference"])
router.add_api_route("/ping", _health, methods=["GET"], tags=["Text Generation Inference"])
router.add_api_route("/", _health, methods=["GET"], tags=["Text Generation Inference"], name="health_root")


@router.get("/metrics", tags=["Text Generation Inference"])
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
