"""The request lifecycle every generation route shares (`RequestLifecycle`: validate → take a permit → generate or
stream → metrics, log and trace once, by outcome), and the HTTP helpers around it.

Route modules (native TGI, OpenAI) only convert their request shapes into `GenerateParameters` and the results
into their response shapes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from transformers import PreTrainedTokenizerBase

from loom.router.response_schemas import inline_schema
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
    return {"requestBody": {"content": {"application/json": {"schema": inline_schema(model)}}, "required": True}}


def compute_type() -> str:
    return os.environ.get("COMPUTE_TYPE", "cpu")


class Outcome(enum.Enum):
    """How one generation ended; its metrics, log line and trace span follow from it (`RequestLifecycle`)."""

    SUCCESS = "success"
    VALIDATION = "validation"
    OVERLOADED = "overloaded"
    GENERATION = "generation"
    TEMPLATE = "template"
    INCOMPLETE = "incomplete"
    DROPPED = "dropped"  # the client went away
    UNAVAILABLE = "unavailable"  # the server is draining: not a failure of the request

    @classmethod
    def of(cls, err: BaseException | None) -> Outcome:
        if err is None:
            return cls.SUCCESS
        if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
            return cls.DROPPED
        if isinstance(err, InferError):
            return _OUTCOME_OF_ERROR.get(err.error_type, cls.INCOMPLETE)
        return cls.INCOMPLETE  # a bug: the route reports it to the client as an incomplete generation


_OUTCOME_OF_ERROR = {
    "validation": Outcome.VALIDATION, "overloaded": Outcome.OVERLOADED, "generation": Outcome.GENERATION,
    "template_error": Outcome.TEMPLATE, "unavailable": Outcome.UNAVAILABLE,
}


class RequestLifecycle:
    """One generation request, validate → take permits → generate or stream → finish, as an async context:

        async with RequestLifecycle(state) as life:
            vreq = await life.validate(inputs, params, stream=False)
            results = await life.generate(vreq, vreq.best_of)     # or: async for item in life.stream(vreq)

    The only writer of a request's metrics, log line and trace span: recorded once, on exit, from the outcome
    (an exception leaving the block, a cancellation, or success). Routes only adapt shapes."""

    def __init__(self, state: RouterState):
        self.state = state
        self.timings = Timings()
        self.results: list[GenerationResult] = []

    async def __aenter__(self) -> RequestLifecycle:
        return self

    async def __aexit__(self, exc_type, exc: BaseException | None, tb) -> bool:
        outcome = Outcome.of(exc)
        if outcome is Outcome.SUCCESS and not self.results:
            outcome = Outcome.INCOMPLETE
        self._record(outcome, exc)
        return False

    async def validate(self, inputs: str, params: GenerateParameters, *, stream: bool, add_special_tokens: bool = True,
                       full_text_default: bool = False) -> ValidatedRequest:
        state = self.state
        state.metrics.request_count.inc()  # TGI counts the inner generate too (chat and completions count twice)
        if state.draining:
            raise UnavailableError("Server is shutting down")
        vreq = await validate(inputs, params, state.tokenizer, state.limits, stream=stream,
                              add_special_tokens=add_special_tokens, return_full_text_default=full_text_default,
                              vision=state.vision)
        if vreq.best_of > state.limits.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {state.limits.max_best_of}. Given: {vreq.best_of}")
        state.metrics.input_length.observe(vreq.input_length)
        state.metrics.max_new_tokens.observe(vreq.params.max_new_tokens or 0)
        self.timings.validated = time.monotonic()
        return vreq

    async def generate(self, vreq: ValidatedRequest, n: int = 1) -> list[GenerationResult]:
        """`n` generations of one request (TGI's best_of), each holding a concurrency permit; all permits are taken
        at once or none (429). If one fails, the others are cancelled (and aborted in the engine)."""
        with self.state.permit(n):
            t = self.timings
            copies = [Timings(t.start, t.validated) for _ in range(n - 1)] + [t]
            self.results = list(await asyncio.gather(*(self.state.generator.generate(vreq, c) for c in copies)))
        return self.results

    async def stream(self, vreq: ValidatedRequest) -> AsyncIterator[StreamItem]:
        """A permitted token stream; closing it (client gone) aborts the request in the engine, which frees its KV
        blocks."""
        with self.state.permit():
            async with aclosing(self.state.generator.stream(vreq, self.timings)) as items:
                async for item in items:
                    if item.result is not None:
                        self.results.append(item.result)
                    yield item

    def _record(self, outcome: Outcome, err: BaseException | None) -> None:
        if outcome is Outcome.SUCCESS:
            for result in self.results:
                _record_success(self.state, result)
            return
        if outcome is not Outcome.UNAVAILABLE:
            self.state.metrics.request_failure.labels(outcome.value).inc()
        message = err.message if isinstance(err, InferError) else \
            "client disconnected" if outcome is Outcome.DROPPED else f"{type(err).__name__}: {err}"
        self.timings.finish_trace({}, error=message)


def _record_success(state: RouterState, result: GenerationResult) -> None:
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


async def generate_text(state: RouterState, inputs: str, params: GenerateParameters, *, add_special_tokens: bool
                        ) -> GenerationResult:
    """Validate and run one generation (the OpenAI routes' unit of work)."""
    async with RequestLifecycle(state) as life:
        vreq = await life.validate(inputs, params, stream=False, add_special_tokens=add_special_tokens)
        return (await life.generate(vreq))[0]


async def stream_text(state: RouterState, inputs: str, params: GenerateParameters, *, add_special_tokens: bool
                      ) -> AsyncIterator[StreamItem]:
    """Validate and stream one generation; errors propagate for the caller to shape."""
    async with RequestLifecycle(state) as life:
        vreq = await life.validate(inputs, params, stream=True, add_special_tokens=add_special_tokens)
        async with aclosing(life.stream(vreq)) as items:
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
                raise asyncio.CancelledError("client disconnected")  # the work's lifecycle records it as dropped
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
