"""Request and response shapes of TGI's native API (router/src/lib.rs), as pydantic models.

Unknown fields are ignored, as in TGI (no `deny_unknown_fields`). Response models keep TGI's key order.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class GrammarType(BaseModel):
    """TGI's `{"type": ..., "value": ...}`; `json_schema` may also come in OpenAI's shape
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (a Loom extension)."""

    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any = None
    json_schema: Any = None


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = None
    # Integer widths are TGI's (usize, i32, u32, u64): a wider value is a deserialization error (422), not a value
    # the engine's message encoding overflows on.
    best_of: int | None = Field(default=None, ge=0, lt=2**64)
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = Field(default=None, ge=-(2**31), lt=2**31)
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=0, lt=2**32)
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = Field(default=None, ge=0, lt=2**64)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    top_n_tokens: int | None = Field(default=None, ge=0, lt=2**32)
    grammar: GrammarType | None = None
    ignore_eos: bool = False  # Loom extension (benchmarks): keep generating past EOS; TGI ignores the field


def default_parameters() -> GenerateParameters:
    """TGI quirk: when `parameters` is absent altogether, sampling is on (with a random seed)."""
    return GenerateParameters(do_sample=True)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: GenerateParameters = Field(default_factory=default_parameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = None
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None
