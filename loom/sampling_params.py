"""Per-request generation parameters, with TGI's names, defaults and validation messages.

The router builds one of these from `GenerateParameters` (or from an OpenAI request); `loom.LLM` takes them
directly. Validation raises `ValueError` with TGI's exact message so the router can return it as a 422 body.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from loom.grammar.spec import GrammarSpec

# TGI caps an unspecified `max_new_tokens` at this many tokens (router/src/validation.rs).
DEFAULT_MAX_NEW_TOKENS_CAP = 1024


@dataclass(slots=True)
class SamplingParams:
    """What to generate and how to pick each token.

    The default is greedy decoding. Sampling is on when `do_sample` is set or any warper is active
    (temperature != 1, top_k, top_p < 1, typical_p < 1), as in TGI's `HeterogeneousNextTokenChooser`.
    """

    max_new_tokens: int | None = None  # None → until the context is full, capped at 1024 (TGI)
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None  # CTRL-style, over prompt + generated ids
    frequency_penalty: float | None = None  # logit -= p * count / len, over prompt + generated ids (TGI)
    presence_penalty: float | None = None  # logit -= p if the id occurs in prompt + generated ids
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop sequences, matched as suffixes of the decoded text
    top_n_tokens: int = 0  # alternatives returned per step, from the processed distribution
    details: bool = False  # return the log-probability of each generated token
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    grammar: GrammarSpec | None = None  # constrain the output to a JSON schema or a regex

    def validate(self) -> None:
        """Raise ValueError with TGI's message for the first invalid field (TGI's validation order)."""
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError("`temperature` must be strictly positive")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError("`repetition_penalty` must be strictly positive")
        if self.frequency_penalty is not None and not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if self.presence_penalty is not None and not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError("`presence_penalty` must be >= -2.0 and <= 2.0")
        if self.top_p is not None and not 0.0 < self.top_p < 1.0:
            raise ValueError("`top_p` must be > 0.0 and < 1.0")
        if self.typical_p is not None and not 0.0 < self.typical_p < 1.0:
            raise ValueError("`typical_p` must be > 0.0 and < 1.0")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError("`top_k` must be strictly positive")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError("`max_new_tokens` must be strictly positive")
        if self.top_n_tokens < 0:
            raise ValueError("`top_n_tokens` must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("`seed` must be an unsigned 64-bit integer")

    @property
    def uses_warpers(self) -> bool:
        return (
            (self.temperature is not None and self.temperature != 1.0)
            or bool(self.top_k)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )

    @property
    def is_sampling(self) -> bool:
        return self.do_sample or self.uses_warpers

    @property
    def uses_penalties(self) -> bool:
        return (
            (self.repetition_penalty is not None and self.repetition_penalty != 1.0)
            or bool(self.frequency_penalty)
            or bool(self.presence_penalty)
        )

    def with_seed(self) -> SamplingParams:
        """A copy with a concrete seed when sampling, so the request is reproducible and the seed reportable."""
        if not self.is_sampling or self.seed is not None:
            return self
        return replace(self, seed=random.getrandbits(64))

    def effective_max_new_tokens(self, prompt_len: int, max_total_tokens: int) -> int:
        """TGI: unspecified → fill the context, capped at 1024; always at least one token."""
        room = max(max_total_tokens - prompt_len, 1)
        if self.max_new_tokens is None:
            return min(room, DEFAULT_MAX_NEW_TOKENS_CAP)
        return self.max_new_tokens
