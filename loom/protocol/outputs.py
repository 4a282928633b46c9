"""What the engine reports after each step: the new tokens of each request, in one batch per step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutput:
    """One request's progress in one step (a delta: only this step's tokens)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[float] = field(default_factory=list)
    new_top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "length" | "eos_token" | "stop_sequence" | "aborted"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    seed: int | None = None
    prompt_logprobs: list[float | None] | None = None  # with the first token, when prompt logprobs were asked
