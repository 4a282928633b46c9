"""Runs a validated request on the engine and turns its token ids into TGI's tokens and text.

Shared by the native and OpenAI routes: they only shape what this yields into their own JSON.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from loom.protocol.outputs import FailureKind, FinishReason
from loom.router.engine_client import EngineClient, EngineError
from loom.router.errors import GenerationError, IncompleteGenerationError, ValidationError, scrub
from loom.router.validation import ValidatedRequest
from loom import tracing
from loom.tokenizer import TextStream, finish_reason


@dataclass(slots=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool

    def as_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "logprob": _json_float(self.logprob), "special": self.special}


# TGI's span names for the routes that generate
SPAN_NAMES = {"/generate": "generate", "/generate_stream": "generate_stream", "/": "compat_generate",
              "/v1/chat/completions": "chat_completions", "/v1/completions": "completions",
              "/invocations": "sagemaker_compatibility", "/vertex": "vertex_compatibility"}


@dataclass
class Timings:
    start: float = field(default_factory=time.monotonic)  # request arrived
    validated: float = 0.0
    first_token: float = 0.0
    end: float = 0.0
    span: Any = None  # the request's trace span (tracing on only)

    def __post_init__(self) -> None:
        if tracing.enabled():
            carrier = tracing.request_carrier.get() or {}
            name = SPAN_NAMES.get(carrier.get("_path", ""), "generate")
            self.span = tracing.start_span(name, carrier, self.start)

    def finish_trace(self, attributes: dict[str, Any], error: str | None = None) -> None:
        """Record validation, queue and inference as child spans and close the request span."""
        if self.span is None:
            return
        end = self.end or time.monotonic()
        if self.validated:
            tracing.child_span(self.span, "validation", self.start, self.validated)
            if self.first_token:
                tracing.child_span(self.span, "queue", self.validated, self.first_token)
                tracing.child_span(self.span, "inference", self.first_token, end)
        tracing.end_span(self.span, end, attributes, error)
        self.span = None

    @property
    def queue(self) -> float:
        return max(self.first_token - self.validated, 0.0)

    @property
    def validation(self) -> float:
        return max(self.validated - self.start, 0.0)

    @property
    def inference(self) -> float:
        return max(self.end - self.first_token, 0.0)

    @property
    def total(self) -> float:
        return max(self.end - self.start, 0.0)


@dataclass
class GenerationResult:
    generated_text: str  # without special tokens, stop text kept; prompt-prefixed when return_full_text
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    tokens: list[TokenInfo]
    top_tokens: list[list[TokenInfo]]
    prefill: list[dict]
    seed: int | None
    input_length: int
    timings: Timings

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    @property
    def mean_logprob(self) -> float:
        lps = [t.logprob for t in self.tokens if t.logprob is not None]
        return sum(lps) / len(lps) if lps else float("-inf")


@dataclass
class StreamItem:
    token: TokenInfo
    top_tokens: list[TokenInfo]
    result: GenerationResult | None  # set on the last item


def _json_float(x: float | None) -> float | None:
    """JSON has no NaN or infinity: TGI (serde_json) writes them as null, e.g. the -inf logprob of a token a tiny
    temperature left no probability."""
    return None if x is None or not math.isfinite(x) else x


class Generator:
    """Submits validated requests to the engine and decodes what comes back."""

    def __init__(self, engine: EngineClient, tokenizer: PreTrainedTokenizerBase, enable_prefill_logprobs: bool):
        self.engine = engine
        self.tokenizer = tokenizer
        self.enable_prefill_logprobs = enable_prefill_logprobs
        self._special = frozenset(tokenizer.all_special_ids)

    def token(self, token_id: int, text: str, logprob: float | None) -> TokenInfo:
        return TokenInfo(token_id, text, logprob, token_id in self._special)

    async def stream(self, req: ValidatedRequest, timings: Timings) -> AsyncIterator[StreamItem]:
        """Yield each generated token as it arrives; the last item carries the whole result. If the consumer stops
        early (client gone), the request is aborted in the engine and its KV blocks freed."""
        timings.validated = timings.validated or time.monotonic()
        prompt_logprobs = req.decoder_input_details and self.enable_prefill_logprobs
        handle = self.engine.submit(uuid.uuid4().hex, req.prompt_token_ids, req.params, prompt_logprobs,
                                    tracing.carrier_of(timings.span), req.images)
        text = TextStream.for_request(self.tokenizer, req.prompt_token_ids, req.params.stop)
        tokens: list[TokenInfo] = []
        tops: list[list[TokenInfo]] = []
        prefill: list[dict] = []
        try:
            async for out in handle:
                if not tokens:
                    timings.first_token = time.monotonic()
                if out.prompt_logprobs is not None:
                    prefill = self._prefill(req.prompt_token_ids, out.prompt_logprobs)
                for i, tid in enumerate(out.new_token_ids):
                    delta, stopped = text.push(tid)
                    tok = self.token(tid, delta, out.new_logprobs[i])
                    top = [self.token(t, self.tokenizer.decode([t]), lp) for t, lp in out.new_top_tokens[i]] \
                        if i < len(out.new_top_tokens) else []
                    tokens.append(tok)
                    tops.append(top)
                    last = out.finished and i == len(out.new_token_ids) - 1
                    reason = finish_reason(out.finish_reason if last else None, stopped)  # stopped: `release` aborts
                    result = self._result(req, out, reason, tokens, tops, prefill, timings) if reason else None
                    yield StreamItem(tok, top, result)
                    if reason is not None:
                        return
        except EngineError as err:
            message = scrub(err.message, first_line=True)  # an engine exception's text: no paths, no trace
            if err.error_type is FailureKind.VALIDATION:
                raise ValidationError(message) from err
            raise GenerationError(message) from err
        finally:
            self.engine.release(handle)
        raise IncompleteGenerationError()

    async def generate(self, req: ValidatedRequest, timings: Timings) -> GenerationResult:
        async with aclosing(self.stream(req, timings)) as items:
            async for item in items:
                if item.result is not None:
                    return item.result
        raise IncompleteGenerationError()

    def _result(self, req, out, reason: FinishReason, tokens, tops, prefill, timings) -> GenerationResult:
        timings.end = time.monotonic()
        # TGI's generated_text: the whole output decoded once more, without special tokens (the streamed token
        # texts keep them)
        text = self.tokenizer.decode([t.id for t in tokens], skip_special_tokens=True)
        if req.return_full_text:
            text = req.inputs + text
        return GenerationResult(
            text, reason.value, tokens, tops if req.top_n_tokens else [], prefill,
            out.seed if req.params.is_sampling else None, req.input_length, timings,
        )

    def _prefill(self, ids: list[int], logprobs: list[float | None]) -> list[dict]:
        return [
            {"id": t, "text": self.tokenizer.decode([t]), "logprob": _json_float(lp)} for t, lp in zip(ids, logprobs)
        ]
