"""The request lifecycle every generation route shares: validate → take a permit → generate or stream → metrics.

Route modules (native TGI, OpenAI) only convert their request shapes into `GenerateParameters` and the results
into their response shapes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from loom.router.state import RouterState
from loom.router.errors import InferError, UnavailableError, ValidationError
from loom.router.generation import GenerationResult, StreamItem, Timings
from loom.router.schemas import GenerateParameters
from loom.router.streams import SSE_HEADERS, with_keepalive
from loom.router.validation import ValidatedRequest, validate

logger = logging.getLogger("loom.router.request")
T = TypeVar("T")
DISCONNECT_POLL_SECONDS = 0.5


def state_of(request: Request) -> RouterState:
    return request.app.state.loom


def body_schema(model) -> dict:
    """OpenAPI request body for routes that parse their JSON themselves (to keep TGI's rejection statuses)."""
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}}


def compute_type() -> str:
    return os.environ.get("COMPUTE_TYPE", "cpu")


async def validated(
    state: RouterState, inputs: str, params: GenerateParameters, *, stream: bool, add_special_tokens: bool = True,
    full_text_default: bool = False,
) -> ValidatedRequest:
    state.metrics.request_count.inc()  # TGI counts the inner generate too (chat and completions count twice)
    if state.draining:
        raise UnavailableError("Server is shutting down")
    try:
        vreq = await validate(inputs, params, state.tokenizer, state.limits, stream=stream,
                              add_special_tokens=add_special_tokens, return_full_text_default=full_text_default)
    except ValidationError:
        state.metrics.request_failure.labels("validation").inc()
        raise
    state.metrics.input_length.observe(vreq.input_length)
    state.metrics.max_new_tokens.observe(vreq.params.max_new_tokens or 0)
    return vreq


def count_failure(state: RouterState, err: InferError) -> None:
    """Validation and overload failures are counted where they are raised; the rest here."""
    if err.error_type in ("validation", "overloaded"):
        return
    label = {"generation": "generation", "template_error": "template"}.get(err.error_type, "incomplete")
    state.metrics.request_failure.labels(label).inc()


def record_success(state: RouterState, result: GenerationResult) -> None:
    m, t = state.metrics, result.timings
    # One line per request with its timings and sizes; the prompt and output text only at debug level.
    logger.info(
        "request done: finish_reason=%s input_tokens=%d generated_tokens=%d validation_ms=%.1f queue_ms=%.1f "
        "inference_ms=%.1f total_ms=%.1f time_per_token_ms=%.1f seed=%s",
        result.finish_reason, result.input_length, result.generated_tokens, t.validation * 1e3, t.queue * 1e3,
        t.inference * 1e3, t.total * 1e3, t.inference * 1e3 / max(result.generated_tokens, 1), result.seed,
        extra={"fields": {
            "finish_reason": result.finish_reason, "input_tokens": result.input_length,
            "generated_tokens": result.generated_tokens, "validation_time": t.validation, "queue_time": t.queue,
            "inference_time": t.inference, "total_time": t.total, "seed": result.seed,
        }},
    )
    logger.debug("request text: %r", result.generated_text)
    t.finish_trace({  # TGI's span fields
        "total_time": t.total, "validation_time": t.validation, "queue_time": t.queue, "inference_time": t.inference,
        "time_per_token": t.inference / max(result.generated_tokens, 1), "seed": result.seed,
        "input_length": result.input_length, "generated_tokens": result.generated_tokens,
        "finish_reason": result.finish_reason,
    })
    m.request_success.inc()
    m.request_duration.observe(t.total)
    m.validation_duration.observe(t.validation)
    m.queue_duration.observe(t.queue)
    m.inference_duration.observe(t.inference)
    m.time_per_token.observe(t.inference / max(result.generated_tokens, 1))
    m.generated_tokens.observe(result.generated_tokens)


async def generate_many(state: RouterState, vreq: ValidatedRequest, timings: Timings, n: int = 1
                        ) -> list[GenerationResult]:
    """`n` generations of one request (TGI's best_of), each holding a concurrency permit; all permits are taken
    at once or none (429). If one fails, the others are cancelled (and aborted in the engine)."""
    try:
        with state.permit(n):
            copies = [Timings(timings.start, timings.validated) for _ in range(n - 1)] + [timings]
            results = await asyncio.gather(*(state.generator.generate(vreq, t) for t in copies))
    except InferError as err:
        count_failure(state, err)
        timings.finish_trace({}, error=err.message)
        raise
    for result in results:
        record_success(state, result)
    return results


async def stream_items(state: RouterState, vreq: ValidatedRequest, timings: Timings) -> AsyncIterator[StreamItem]:
    """A permitted token stream; InferErrors propagate for the caller to shape. Closing it (client gone) aborts
    the request in the engine, which frees its KV blocks."""
    try:
        with state.permit():
            async with aclosing(state.generator.stream(vreq, timings)) as items:
                async for item in items:
                    if item.result is not None:
                        record_success(state, item.result)
                    yield item
    except InferError as err:
        count_failure(state, err)
        timings.finish_trace({}, error=err.message)
        raise
    except (GeneratorExit, asyncio.CancelledError):
        state.metrics.request_failure.labels("dropped").inc()
        timings.finish_trace({}, error="client disconnected")
        raise


async def generate_text(state: RouterState, inputs: str, params: GenerateParameters, *, add_special_tokens: bool
                        ) -> GenerationResult:
    """Validate and run one generation (the OpenAI routes' unit of work)."""
    timings = Timings()
    vreq = await validated(state, inputs, params, stream=False, add_special_tokens=add_special_tokens)
    timings.validated = time.monotonic()
    return (await generate_many(state, vreq, timings))[0]


async def stream_text(state: RouterState, inputs: str, params: GenerateParameters, *, add_special_tokens: bool
                      ) -> AsyncIterator[StreamItem]:
    """Validate and stream one generation; errors propagate for the caller to shape."""
    timings = Timings()
    vreq = await validated(state, inputs, params, stream=True, add_special_tokens=add_special_tokens)
    timings.validated = time.monotonic()
    async with aclosing(stream_items(state, vreq, timings)) as items:
        async for item in items:
            yield item


async def until_disconnected(request: Request, state: RouterState, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (its engine requests are then aborted).
    Uvicorn does not cancel non-streaming handlers by itself."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                state.metrics.request_failure.labels("dropped").inc()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


def sse_response(events: AsyncIterator[bytes], characters: int) -> StreamingResponse:
    headers = {**SSE_HEADERS, "x-compute-type": compute_type(), "x-compute-characters": str(characters)}
    return StreamingResponse(with_keepalive(events), media_type="text/event-stream", headers=headers)


def response_headers(results: list[GenerationResult], characters: int) -> dict[str, str]:
    """TGI's timing and token headers on non-streamed responses (summed over several results)."""
    t = results[0].timings
    tokens = sum(r.generated_tokens for r in results)

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": compute_type(),
        "x-compute-time": f"{t.total}",
        "x-compute-characters": str(characters),
        "x-total-time": ms(t.total),
        "x-validation-time": ms(t.validation),
        "x-queue-time": ms(t.queue),
        "x-inference-time": ms(t.inference),
        "x-time-per-token": ms(t.inference / max(tokens, 1)),
        "x-prompt-tokens": str(sum(r.input_length for r in results)),
        "x-generated-tokens": str(tokens),
    }


def tokens_with_offsets(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = True,
                        truncate: int | None = None) -> list[dict]:
    """TGI's /tokenize items: id, the input text the token covers, and its byte offsets."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    token_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if truncate:
        token_ids, offsets = token_ids[-truncate:], offsets[-truncate:]
    data = text.encode()
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode()))
    out = []
    for tid, (start, stop) in zip(token_ids, offsets):
        b0, b1 = byte_at[start], byte_at[stop]
        out.append({"id": tid, "text": data[b0:b1].decode(errors="replace"), "start": b0, "stop": b1})
    return out
