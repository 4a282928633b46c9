"""The request checks exist once (loom.sampling_params): the router's `check_parameters`/`validate` and the engine's
`add_request` (behind `loom.LLM`) give the same TGI message, in the same order, for the same invalid request.

The engine side runs `EngineCore.add_request` on a stand-in engine (only the fields the checks read: every case
here is refused before a request is built), so no model is loaded.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from loom.engine.core import EngineCore
from loom.router.errors import ValidationError
from loom.router.schemas import GenerateParameters
from loom.router.validation import Limits, check_parameters, validate
from loom.sampling_params import (
    DEFAULT_MAX_NEW_TOKENS_CAP,
    SamplingParams,
    check_sampling,
    check_token_budget,
    resolve_max_new_tokens,
)

MAX_TOTAL = 64
LIMITS = Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=MAX_TOTAL,
                max_total_tokens=MAX_TOTAL)


class FakeTokenizer:
    """One token per character."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 50 for c in text]


def router_message(inputs: str = "hello", **fields) -> str:
    with pytest.raises(ValidationError) as err:
        asyncio.run(validate(inputs, GenerateParameters(**fields), FakeTokenizer(), LIMITS, stream=False))
    return err.value.detail


def engine_message(prompt_len: int = 5, **fields) -> str:
    engine = SimpleNamespace(model_config=SimpleNamespace(vocab_size=1000), max_total_tokens=MAX_TOTAL)
    with pytest.raises(ValueError) as err:
        EngineCore.add_request(engine, "r", list(range(prompt_len)), SamplingParams(**fields))
    return str(err.value)


def params_message(**fields) -> str:
    with pytest.raises(ValueError) as err:
        SamplingParams(**fields).validate(max_stop_sequences=LIMITS.max_stop_sequences,
                                          max_top_n_tokens=LIMITS.max_top_n_tokens)
    return str(err.value)


# (fields, TGI's message). Every field the router and the engine both take.
INVALID = [
    (dict(temperature=0.0), "`temperature` must be strictly positive"),
    (dict(temperature=-1.0), "`temperature` must be strictly positive"),
    (dict(repetition_penalty=0.0), "`repetition_penalty` must be strictly positive"),
    (dict(repetition_penalty=-1.0), "`repetition_penalty` must be strictly positive"),
    (dict(frequency_penalty=2.5), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (dict(frequency_penalty=-2.01), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (dict(top_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
    (dict(top_p=0.0), "`top_p` must be > 0.0 and < 1.0"),
    (dict(typical_p=1.0), "`typical_p` must be > 0.0 and < 1.0"),
    (dict(typical_p=0.0), "`typical_p` must be > 0.0 and < 1.0"),
    (dict(top_k=0), "`top_k` must be strictly positive"),
    (dict(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    # Several invalid fields: the first in TGI's order wins.
    (dict(temperature=0.0, top_k=0, max_new_tokens=0), "`temperature` must be strictly positive"),
    (dict(top_p=1.0, typical_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
    (dict(top_k=0, max_new_tokens=0), "`top_k` must be strictly positive"),
]


@pytest.mark.parametrize(("fields", "message"), INVALID)
def test_same_message_from_router_and_engine(fields: dict, message: str) -> None:
    assert router_message(**fields) == message
    with pytest.raises(ValidationError) as err:
        check_parameters(GenerateParameters(**fields), LIMITS, stream=False)
    assert err.value.detail == message
    assert engine_message(**fields) == message
    assert params_message(**fields) == message


# The router's limits, given to `validate`: the same message as the router's 422.
LIMITED = [
    (dict(top_n_tokens=6), "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    (dict(stop=["a"] * 5), "`stop` supports up to 4 stop sequences. Given: 5"),
    (dict(stop=["a"] * 5, top_n_tokens=6), "`stop` supports up to 4 stop sequences. Given: 5"),
    (dict(max_new_tokens=0, stop=["a"] * 5), "`max_new_tokens` must be strictly positive"),
]


@pytest.mark.parametrize(("fields", "message"), LIMITED)
def test_limits_give_the_router_message(fields: dict, message: str) -> None:
    assert router_message(**fields) == message
    assert params_message(**fields) == message


def test_router_only_checks_keep_their_place_in_tgi_order() -> None:
    def check(stream: bool = False, **fields) -> str:
        with pytest.raises(ValidationError) as err:
            check_parameters(GenerateParameters(**fields), LIMITS, stream)
        return err.value.detail

    # best_of before the sampling fields; seed vs best_of between the stop count and top_n_tokens.
    assert check(best_of=2, repetition_penalty=0.0) == "you must use sampling when `best_of` is > 1"
    assert check(best_of=2, stream=True, temperature=0.0) == "`best_of` != 1 is not supported when streaming tokens"
    assert check(best_of=2, do_sample=True, seed=1, top_n_tokens=6) == "`seed` must not be set when `best_of` > 1"
    assert check(best_of=2, do_sample=True, seed=1, stop=["a"] * 5) == (
        "`stop` supports up to 4 stop sequences. Given: 5")
    assert check(best_of=2, do_sample=True, seed=1, max_new_tokens=0) == "`max_new_tokens` must be strictly positive"
    assert check(top_n_tokens=6, decoder_input_details=True, stream=True) == (
        "`top_n_tokens` must be >= 0 and <= 5. Given: 6")
    assert check(decoder_input_details=True, stream=True, watermark=True) == (
        "`decoder_input_details` == true is not supported when streaming tokens")
    assert check_parameters(GenerateParameters(watermark=True), LIMITS, False) == 1  # watermarking is served


def test_engine_only_fields() -> None:
    """Fields the router never passes unchecked (pydantic bounds, or OpenAI's presence_penalty mapped onto
    repetition_penalty as in TGI): the engine and `loom.LLM` check them with the same function."""
    assert engine_message(presence_penalty=2.5) == "`presence_penalty` must be >= -2.0 and <= 2.0"
    assert engine_message(seed=-1) == "`seed` must be an unsigned 64-bit integer"
    assert engine_message(seed=2**64) == "`seed` must be an unsigned 64-bit integer"
    assert engine_message(top_n_tokens=-1) == "`top_n_tokens` must be >= 0"
    assert engine_message(max_new_tokens=-3) == "`max_new_tokens` must be strictly positive"
    with pytest.raises(ValueError, match=r"^`top_n_tokens` must be >= 0 and <= 5. Given: -1$"):
        check_sampling(top_n_tokens=-1, max_top_n_tokens=5)
    SamplingParams(stop=["a"] * 100, top_n_tokens=100).validate()  # no limits: only the ranges


@pytest.mark.parametrize(("prompt_len", "max_new_tokens", "message"), [
    (5, 60, "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 5 `inputs` tokens and 60 `max_new_tokens`"),
    (60, 10, "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 60 `inputs` tokens and 10 `max_new_tokens`"),
    # Unspecified: the room left, floored at 0 (TGI), so a prompt past the context reports 0 new tokens...
    (70, None, "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 70 `inputs` tokens and 0 `max_new_tokens`"),
    # ...and one that fills it exactly leaves no room for a token.
    (64, None, "`max_new_tokens` must be strictly positive"),
])
def test_same_token_budget_message(prompt_len: int, max_new_tokens: int | None, message: str) -> None:
    limits = Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=100,
                    max_total_tokens=MAX_TOTAL)
    with pytest.raises(ValidationError) as err:
        asyncio.run(validate("x" * prompt_len, GenerateParameters(max_new_tokens=max_new_tokens), FakeTokenizer(),
                             limits, stream=False))
    assert err.value.detail == message
    assert engine_message(prompt_len, max_new_tokens=max_new_tokens) == message


def test_unspecified_max_new_tokens_resolves_alike() -> None:
    assert resolve_max_new_tokens(None, 5, MAX_TOTAL) == MAX_TOTAL - 5
    assert resolve_max_new_tokens(None, 5, 10_000) == DEFAULT_MAX_NEW_TOKENS_CAP
    assert resolve_max_new_tokens(None, 70, MAX_TOTAL) == 0
    assert resolve_max_new_tokens(7, 70, MAX_TOTAL) == 7
    check_token_budget(5, MAX_TOTAL - 5, MAX_TOTAL)
    # What the router resolves is what it sends the engine: the engine accepts it unchanged.
    r = asyncio.run(validate("hello", GenerateParameters(), FakeTokenizer(), LIMITS, stream=False))
    assert r.params.max_new_tokens == MAX_TOTAL - 5
    assert resolve_max_new_tokens(r.params.max_new_tokens, 5, MAX_TOTAL) == MAX_TOTAL - 5
