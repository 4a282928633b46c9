"""Request and response shapes of TGI's native API (router/src/lib.rs), as pydantic models.

Unknown fields are ignored, as in TGI (no `deny_unknown_fields`). Response models keep TGI's key order.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class GrammarType(BaseModel):
    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any = None


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: Optional[str] = None
    best_of: Optional[int] = Field(default=None, ge=0)
    temperature: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    typical_p: Optional[float] = None
    do_sample: bool = False
    max_new_tokens: Optional[int] = Field(default=None, ge=0, lt=2**32)
    return_full_text: Optional[bool] = None
    stop: list[str] = Field(default_factory=list)
    truncate: Optional[int] = Field(default=None, ge=0)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: Optional[int] = Field(default=None, ge=0, lt=2**64)
    top_n_tokens: Optional[int] = Field(default=None, ge=0, lt=2**32)
    grammar: Optional[GrammarType] = None


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
    logprob: Optional[float]
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: Optional[float]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: Optional[int]
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: Optional[list[list[Token]]] = None


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: Optional[int]
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: Optional[list[BestOfSequence]] = None
    top_tokens: Optional[list[list[Token]]] = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Optional[Details] = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: Optional[int]
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: Optional[list[Token]] = None
    generated_text: Optional[str] = None
    details: Optional[StreamDetails] = None
