"""Per-request generation parameters, with TGI's names, defaults and validation messages.

The router builds one of these from `GenerateParameters` (or from an OpenAI request); `loom.LLM` takes them
directly. Validation raises `ValueError` with TGI's exact message so the router can return it as a 422 body.
The checks live here once (`check_sampling`, `check_token_budget`): the router's `check_parameters`/`validate` and
the engine's `add_request` (which `loom.LLM` goes through) call the same functions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np

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
    watermark: bool = False  # bias each token toward a green list seeded by the previous token (Kirchenbauer et al.)
    adapter_id: str | None = None  # the LoRA adapter (--lora-adapters) this request runs with; None: the base model

    def validate(self, *, max_stop_sequences: int | None = None, max_top_n_tokens: int | None = None) -> None:
        """Raise ValueError with TGI's message for the first invalid field (`check_sampling`)."""
        check_sampling(
            temperature=self.temperature, repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty, top_p=self.top_p,
            typical_p=self.typical_p, top_k=self.top_k, max_new_tokens=self.max_new_tokens,
            num_stop_sequences=len(self.stop), max_stop_sequences=max_stop_sequences, seed=self.seed,
            top_n_tokens=self.top_n_tokens, max_top_n_tokens=max_top_n_tokens,
        )

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


def check_sampling(
    *, temperature: float | None = None, repetition_penalty: float | None = None,
    frequency_penalty: float | None = None, presence_penalty: float | None = None, top_p: float | None = None,
    typical_p: float | None = None, top_k: int | None = None, max_new_tokens: int | None = None,
    num_stop_sequences: int = 0, max_stop_sequences: int | None = None, seed: int | None = None, best_of: int = 1,
    top_n_tokens: int | None = None, max_top_n_tokens: int | None = None,
) -> None:
    """The parameter checks, the one implementation for the router (`check_parameters`), the engine
    (`EngineCore.add_request`, through `SamplingParams.validate`) and `loom.LLM`.

    Raises ValueError with TGI's exact message for the first invalid value, in TGI's order
    (router/src/validation.rs): temperature → repetition_penalty → frequency_penalty (→ presence_penalty, Loom's
    offline API; the router maps OpenAI's onto repetition_penalty as TGI does) → top_p → typical_p → top_k →
    max_new_tokens → stop count → seed → top_n_tokens. None means unset. The limits are the router's
    (`--max-stop-sequences`, `--max-top-n-tokens`); without them only the range of the value is checked.
    `best_of` (router only) is here for the seed check, which TGI makes between the stop and top_n checks.
    """
    # TGI reads temperature as an f32: a positive value below f32's range (1e-300) is 0 there, and refused
    if temperature is not None and (temperature <= 0 or float(np.float32(temperature)) == 0.0):
        raise ValueError("`temperature` must be strictly positive")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValueError("`repetition_penalty` must be strictly positive")
    if frequency_penalty is not None and not -2.0 <= frequency_penalty <= 2.0:
        raise ValueError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if presence_penalty is not None and not -2.0 <= presence_penalty <= 2.0:
        raise ValueError("`presence_penalty` must be >= -2.0 and <= 2.0")
    if top_p is not None and not 0.0 < top_p < 1.0:
        raise ValueError("`top_p` must be > 0.0 and < 1.0")
    if typical_p is not None and not 0.0 < typical_p < 1.0:
        raise ValueError("`typical_p` must be > 0.0 and < 1.0")
    if top_k is not None and top_k <= 0:
        raise ValueError("`top_k` must be strictly positive")
    if max_new_tokens is not None:
        check_max_new_tokens(max_new_tokens)
    if max_stop_sequences is not None and num_stop_sequences > max_stop_sequences:
        raise ValueError(f"`stop` supports up to {max_stop_sequences} stop sequences. Given: {num_stop_sequences}")
    if seed is not None and best_of > 1:
        raise ValueError("`seed` must not be set when `best_of` > 1")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError("`seed` must be an unsigned 64-bit integer")
    top_n = top_n_tokens or 0
    if max_top_n_tokens is not None and not 0 <= top_n <= max_top_n_tokens:
        raise ValueError(f"`top_n_tokens` must be >= 0 and <= {max_top_n_tokens}. Given: {top_n}")
    if top_n < 0:
        raise ValueError("`top_n_tokens` must be >= 0")


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens <= 0:
        raise ValueError("`max_new_tokens` must be strictly positive")


def resolve_max_new_tokens(max_new_tokens: int | None, input_length: int, max_total_tokens: int) -> int:
    """TGI: an unspecified `max_new_tokens` fills what is left of the context (0 when nothing is), capped at 1024.
    The result can be 0 or overflow the context: `check_token_budget` and `check_max_new_tokens` reject those."""
    if max_new_tokens is not None:
        return max_new_tokens
    return min(max(max_total_tokens - input_length, 0), DEFAULT_MAX_NEW_TOKENS_CAP)


def check_token_budget(input_length: int, max_new_tokens: int, max_total_tokens: int) -> None:
    """TGI's `MaxTotalTokens` check, with the resolved (1024-capped when unspecified) `max_new_tokens`."""
    if input_length + max_new_tokens > max_total_tokens:
        raise ValueError(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
