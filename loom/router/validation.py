"""Request validation at the edge, with TGI's checks, order and messages (router/src/validation.rs).

Turns a prompt and `GenerateParameters` into token ids and engine `SamplingParams`, or raises `ValidationError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import msgspec
from transformers import PreTrainedTokenizerBase

from loom.protocol.multimodal import ImageInput
from loom.router.errors import ValidationError, scrub
from loom.router.grammar import grammar_spec
from loom.router.images import VisionInputs
from loom.router.schemas import GenerateParameters
from loom.sampling_params import (
    SamplingParams, check_max_new_tokens, check_sampling, check_token_budget, resolve_max_new_tokens,
)


@dataclass(frozen=True)
class Limits:
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    disable_grammar_support: bool = False


@dataclass(frozen=True)
class ValidatedRequest:
    inputs: str
    prompt_token_ids: list[int]
    params: SamplingParams  # max_new_tokens resolved (TGI caps an unspecified value at 1024)
    best_of: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    top_n_tokens: int
    images: list[ImageInput] = field(default_factory=list)  # a vision-language prompt's images

    @property
    def input_length(self) -> int:
        return len(self.prompt_token_ids)


@contextmanager
def _as_validation_error() -> Iterator[None]:
    """The shared checks (loom.sampling_params) raise ValueError with TGI's message: a 422 here."""
    try:
        yield
    except ValueError as err:
        raise ValidationError(str(err)) from err


def check_parameters(p: GenerateParameters, limits: Limits, stream: bool) -> int:
    """The checks that need no tokenizer, in TGI's order. Returns best_of.

    The sampling fields are checked by `check_sampling`, shared with the engine and `loom.LLM`; the best_of,
    and streaming checks are the router's own."""
    best_of = p.best_of if p.best_of not in (None, 0) else 1
    if p.best_of is not None and p.best_of != 1 and stream:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    if best_of > 1 and not sampling:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    with _as_validation_error():
        check_sampling(
            temperature=p.temperature, repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
            top_p=p.top_p, typical_p=p.typical_p, top_k=p.top_k, max_new_tokens=p.max_new_tokens,
            num_stop_sequences=len(p.stop), max_stop_sequences=limits.max_stop_sequences, seed=p.seed,
            best_of=best_of, top_n_tokens=p.top_n_tokens, max_top_n_tokens=limits.max_top_n_tokens,
        )
    if p.decoder_input_details and stream:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    return best_of


async def validate(
    inputs: str, p: GenerateParameters, tokenizer: PreTrainedTokenizerBase, limits: Limits, *, stream: bool,
    add_special_tokens: bool = True, return_full_text_default: bool = False, vision: VisionInputs | None = None,
) -> ValidatedRequest:
    """`vision`: a vision-language model's image handling (markdown images in `inputs` become image tokens)."""
    best_of = check_parameters(p, limits, stream)
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    if p.truncate is not None and (p.truncate == 0 or p.truncate > limits.max_input_tokens):
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. Given: {p.truncate}"
        )
    images: list[ImageInput] = []
    with_images = await vision.prompt(inputs, add_special_tokens) if vision is not None else None
    if with_images is not None:
        ids, images = with_images.token_ids, with_images.images
    else:
        try:
            # Tokenizing is CPU work: off the event loop, like TGI's validation workers.
            ids = await asyncio.to_thread(tokenizer.encode, inputs, add_special_tokens=add_special_tokens)
        except Exception as err:
            raise ValidationError(f"tokenizer error {scrub(str(err))}") from err
    if p.truncate is not None:
        cut = max(len(ids) - p.truncate, 0)
        ids = ids[cut:]  # TGI keeps the last `truncate` tokens
        images = _after_cut(images, cut)
    input_length = len(ids)
    max_new = resolve_max_new_tokens(p.max_new_tokens, input_length, limits.max_total_tokens)
    with _as_validation_error():
        check_token_budget(input_length, max_new, limits.max_total_tokens)
    if input_length > limits.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}")
    grammar = grammar_spec(p.grammar, limits.disable_grammar_support) if p.grammar is not None else None
    with _as_validation_error():
        check_max_new_tokens(max_new)
    params = SamplingParams(
        max_new_tokens=max_new, do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        typical_p=p.typical_p, repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
        seed=p.seed, stop=list(p.stop), top_n_tokens=p.top_n_tokens or 0, details=True, ignore_eos=p.ignore_eos,
        grammar=grammar, watermark=p.watermark, adapter_id=p.adapter_id,
    )
    full_text = p.return_full_text if p.return_full_text is not None else return_full_text_default
    return ValidatedRequest(
        inputs, ids, params, best_of, p.details or p.decoder_input_details, p.decoder_input_details, full_text,
        p.top_n_tokens or 0, images,
    )


def _after_cut(images: list[ImageInput], cut: int) -> list[ImageInput]:
    """The images left once the first `cut` prompt tokens are truncated away, placed in the shorter prompt; an
    image cut through cannot be shown in part: refused."""
    if not cut:
        return images
    kept = []
    for image in images:
        if image.end <= cut:
            continue
        if image.offset < cut:
            raise ValidationError(f"`truncate` cuts through an image: its tokens are at positions {image.offset} to "
                                  f"{image.end - 1} and the first {cut} tokens are dropped")
        kept.append(msgspec.structs.replace(image, offset=image.offset - cut))
    return kept
