"""Request bodies of the OpenAI-compatible routes as TGI accepts them (router/src/lib.rs): unknown fields are
ignored; `max_completion_tokens` is an alias of `max_tokens`; an empty prompt array is a deserialization error."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, RootModel
from pydantic_core import PydanticCustomError

from loom.router.chat import Message, Tool
from loom.router.schemas import CompatGenerateRequest, GrammarType

U32 = Field(default=None, ge=0, lt=2**32)




class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message]
    frequency_penalty: float | None = None
    logit_bias: list[float] | None = None  # accepted, unused (TGI)
    logprobs: bool | None = None
    top_logprobs: int | None = U32
    max_tokens: int | None = Field(
        default=None, ge=0, lt=2**32, validation_alias=AliasChoices("max_tokens", "max_completion_tokens"))
    n: int | None = U32  # accepted, unused: always one choice (TGI)
    presence_penalty: float | None = None
    stop: list[str] | None = None
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Tool] | None = None
    tool_prompt: str | None = None
    tool_choice: str | dict | None = None
    response_format: GrammarType | None = None
    stream_options: StreamOptions | None = None


def _prompt_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and not value:
        raise PydanticCustomError("empty_array", "Empty array detected. Do not use an empty array for the prompt.")
    return value


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Annotated[list[str], BeforeValidator(_prompt_list)]
    max_tokens: int | None = U32
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    suffix: str | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False  # Loom extension, as in vLLM (benchmarks): keep generating past EOS


class SagemakerRequest(RootModel):
    """TGI's untagged enum: the first shape that deserializes wins (`inputs`, then `messages`, then `prompt`)."""

    root: Annotated[CompatGenerateRequest | ChatRequest | CompletionRequest, Field(union_mode="left_to_right")]
