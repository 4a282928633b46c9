"""Chat messages and templating with Hugging Face semantics, applied the way TGI applies them
(router/src/lib.rs `Message`, router/src/infer/chat_template.rs).

Each message is flattened to `{role, content: str}` first; the template is rendered by the tokenizer's own
`apply_chat_template` (Jinja, with `raise_exception` and `strftime_now`) with `add_generation_prompt=True`; a trailing
assistant message is then continued rather than closed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from transformers import PreTrainedTokenizerBase

from loom.router.errors import TemplateError, scrub
from loom.router.streams import compact


class ImageUrl(BaseModel):
    url: str


class TextChunk(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrlChunk(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


MessageChunk = Annotated[TextChunk | ImageUrlChunk, Field(discriminator="type")]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    description: str | None = None
    name: str
    arguments: Any = Field(validation_alias=AliasChoices("arguments", "parameters"))

    def as_dict(self) -> dict:
        """TGI re-serializes `arguments` as a JSON string (kept as is when it already is one) and `description`
        as null when absent."""
        args = self.arguments if isinstance(self.arguments, str) else compact(self.arguments)
        return {"description": self.description, "name": self.name, "arguments": args}


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: str
    function: FunctionDefinition

    def as_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "function": self.function.as_dict()}


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "function"
    function: FunctionDefinition


class Message(BaseModel):
    """`{"role", "content": str | [chunks], "name"?}` or `{"role", "tool_calls": [...]}` (TGI's untagged body:
    content wins when both are present)."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[MessageChunk] | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _has_body(self) -> Message:
        if self.content is None and self.tool_calls is None:
            raise PydanticCustomError("message_body", "a message needs `content` or `tool_calls`")
        return self

    def flatten(self) -> dict[str, str]:
        """Text chunks joined with "", images as `![](url)`, a tool-call message as the JSON of its calls.
        `name` and `tool_call_id` are dropped, as in TGI."""
        if isinstance(self.content, str):
            content = self.content
        elif self.content is not None:
            content = "".join(c.text if isinstance(c, TextChunk) else f"![]({c.image_url.url})" for c in self.content)
        else:
            content = compact([call.as_dict() for call in self.tool_calls or []])
        return {"role": self.role, "content": content}


# ---------------------------------------------------------------------------------------------------------------
# Template source


def find_template_source(model_dir: str | Path, tokenizer_config_path: str | None = None) -> str | None:
    """TGI's priority: chat_template.json > tokenizer_config.json (or `--tokenizer-config-path`) >
    processor_config.json. `chat_template.jinja` is the newer spelling of chat_template.json (transformers saves
    templates there and prefers it), so it ranks first. A list of named templates yields the one named "default"."""
    d = Path(model_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tokenizer_config = Path(tokenizer_config_path) if tokenizer_config_path else d / "tokenizer_config.json"
    for path in (d / "chat_template.json", tokenizer_config, d / "processor_config.json"):
        source = _select(_json_key(path, "chat_template"))
        if source is not None:
            return source
    return None


def _json_key(path: Path, key: str) -> Any:
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get(key) if isinstance(data, dict) else None


def _select(value: Any) -> str | None:
    """A template string, or the entry named "default" of a list of `{name, template}` (or a name → template map)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict) and isinstance(value.get("default"), str):
        return value["default"]
    return None


def _rewrite(source: str) -> str:
    # TGI: content is always flattened to a string, so a template reaching into the first chunk reads it whole.
    return source.replace("messages[0]['content'][0]['text']", "messages[0]['content']")


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def continue_final_message(rendered: str, messages: list[dict[str, str]]) -> str:
    """When the last message is the assistant's, cut the prompt right after the last occurrence of its content and
    right-trim it (dropping the end-of-turn), so the model continues that message instead of starting a new one.

        <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nOnce upon<|im_end|>\\n<|im_start|>assistant\\n
                                                           ^ cut here ^
    """
    if not messages or messages[-1]["role"] != "assistant":
        return rendered
    content = messages[-1]["content"]
    at = rendered.rfind(content)
    if at < 0:
        return rendered
    return rendered[: at + len(content)].rstrip()


@dataclass(frozen=True)
class ChatTemplate:
    tokenizer: PreTrainedTokenizerBase
    source: str | None  # None: every request fails with "template not found"

    @classmethod
    def load(
        cls, tokenizer: PreTrainedTokenizerBase, model_dir: str | Path, tokenizer_config_path: str | None = None
    ) -> ChatTemplate:
        source = find_template_source(model_dir, tokenizer_config_path)
        if source is None:  # a template transformers found elsewhere (e.g. additional_chat_templates/)
            source = _select(tokenizer.chat_template)
        return cls(tokenizer, _rewrite(source) if source is not None else None)

    def apply(self, messages: list[Message], tools: list[dict] | None = None) -> str:
        """Render the prompt. `tools` (already in the shape the template expects) is passed to the template as the
        `tools` variable. Raises TemplateError (422) for a missing template or any rendering failure."""
        if self.source is None:
            raise TemplateError("template not found")
        flat = [m.flatten() for m in messages]
        try:
            rendered = self.tokenizer.apply_chat_template(
                flat, tools=tools, chat_template=self.source, add_generation_prompt=True, tokenize=False,
            )
        except Exception as err:
            raise TemplateError(scrub(str(err))) from err
        return continue_final_message(rendered, flat)
