"""What the engine reports after each step: the new tokens of each request, in one batch per step; and the
enums that cross the router ↔ engine boundary (msgpack carries their values)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """Why a request stopped: TGI's three reasons, and ABORTED (cancelled; never reported to a client)."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"


class FailureKind(str, enum.Enum):
    """How a request failed in the engine: refused on arrival (the router answers 422) or failed while running
    (424); TGI's `error_type` values."""

    VALIDATION = "validation"
    GENERATION = "generation"


def failure_message(err: BaseException) -> str:
    """What a client is told of an exception in its request's part of a step: the first line of the message (no
    trace, no chained causes), as TGI's 'Server error: ...' generation errors read."""
    lines = str(err).strip().splitlines()
    return f"Server error: {lines[0][:300] if lines else type(err).__name__}"


@dataclass(slots=True)
class RequestOutput:
    """One request's progress in one step (a delta: only this step's tokens)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[float] = field(default_factory=list)
    new_top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    seed: int | None = None
    prompt_logprobs: list[float | None] | None = None  # with the first token, when prompt logprobs were asked
    error: str | None = None  # the request failed in this step (finished, no finish reason): why
