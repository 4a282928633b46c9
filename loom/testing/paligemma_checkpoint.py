"""Tiny random PaliGemma checkpoints (PaliGemma 1 over Gemma, PaliGemma 2 over Gemma 2) and a tiny random Gemma
(v1) text model, built offline with `transformers`, and transformers' PaliGemma as the oracle.

Built like `vlm_checkpoints` (whose helpers this reuses): `save_pretrained` of the model and of a full
`PaliGemmaProcessor` (SigLIP image processor, PIL backend, and the GPT-2 byte-level tokenizer with `<image>`),
every tensor random and none constant. The processor adds PaliGemma's 1024 `<locNNNN>` and 128 `<segNNN>` tokens
to the tokenizer, so the language model's vocabulary is widened to hold them (`VOCAB`).

PaliGemma's prompt is its prefix: the processor writes `<image>` x 16, BOS, the text and "\\n", with
`token_type_ids` 0 on every position; transformers then lets the prefix attend to itself both ways (and, on
Gemma 2's sliding layers, past the window: the text config's window is 8 tokens here, shorter than any prompt).
`paligemma_reference` calls the model as `generate` does: the processor's ids, pixels and token types, or for a
text-only prompt (which the processor refuses) the tokenizer's ids with token types 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loom.testing.vlm_checkpoints import IM_END, INIT_STD, _randomise, _tokenizer, load_hf

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 50259  # after <|im_start|>, <|im_end|> (the tokenizer of `vlm_checkpoints`' Llava family)
VOCAB = 51456  # GPT-2's 50257 + 3 special tokens + PaliGemma's 1152 location/segmentation tokens, padded to 64
WINDOW = 8  # Gemma 2's sliding window, shorter than every test prompt
TOKENS_PER_IMAGE = 16  # 32x32 pixels, 8x8 patches

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8, num_channels=3)
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, vocab_size=VOCAB,
             bos_token_id=50256, pad_token_id=50256)


def _tied(version: int) -> bool:
    # PaliGemma 2's head is tied, as in the released checkpoints; PaliGemma 1's is its own, with larger weights
    # (a tied random Gemma mostly repeats its last input token: its residual stream is mostly that token's
    # sqrt(hidden)-scaled embedding), so that greedy continuations vary
    return version == 2


_GEMMA_STD = 0.3  # Gemma (v1) weights' init std (PaliGemma 2's Gemma 2: INIT_STD)


def _text_config(version: int, eos: int):
    import transformers as T

    if version == 1:
        return T.GemmaConfig(**_TEXT, eos_token_id=eos, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=False,
                             initializer_range=_GEMMA_STD)
    # an attention cap small enough that tanh saturates; the final cap at Gemma 2's 30 (a saturated one makes
    # near-ties of the top logits, and greedy tokens that fp32 rounding may flip)
    return T.Gemma2Config(**_TEXT, eos_token_id=eos, tie_word_embeddings=True, initializer_range=INIT_STD,
                          sliding_window=WINDOW, query_pre_attn_scalar=24,
                          layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=4.0,
                          final_logit_softcapping=30.0)


def build_tiny_paligemma(out_dir: str | Path, version: int = 2, seed: int = 0) -> Path:
    """Save a tiny random PaliGemma (`version` 1: Gemma, 2: Gemma 2) with its processor into `out_dir`."""
    import transformers as T

    if version not in (1, 2):
        raise ValueError(f"PaliGemma version is 1 or 2, not {version!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer("llava")  # GPT-2 + <|im_start|>, <|im_end|>, <image> (named `image_token`)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    eos = tok.convert_tokens_to_ids(IM_END)
    image_processor = T.SiglipImageProcessorPil(size={"height": 32, "width": 32},
                                                image_seq_length=TOKENS_PER_IMAGE)
    processor = T.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds <loc>/<seg> tokens
    assert len(processor.tokenizer) <= VOCAB, len(processor.tokenizer)
    config = T.PaliGemmaConfig(
        vision_config=T.SiglipVisionConfig(**_VISION, vision_use_head=False, initializer_range=INIT_STD),
        text_config=_text_config(version, eos), image_token_index=IMAGE_TOKEN_ID, projection_dim=64,
        hidden_size=64, vocab_size=VOCAB, tie_word_embeddings=_tied(version), bos_token_id=50256, eos_token_id=eos,
        pad_token_id=50256)
    assert config.text_config.num_image_tokens == TOKENS_PER_IMAGE
    torch.manual_seed(seed)
    model = T.PaliGemmaForConditionalGeneration(config).to(torch.float32).eval()
    _randomise(model, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    T.GenerationConfig(bos_token_id=50256, eos_token_id=eos, pad_token_id=50256, do_sample=False).save_pretrained(
        str(out))
    return out


def build_tiny_gemma(out_dir: str | Path, tokenizer_from: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Gemma (v1) text model, every weight random (norm scales included), with the GPT-2 test
    tokenizer copied from `tokenizer_from`."""
    import transformers as T

    from loom.testing.tiny_models import PADDED_VOCAB, copy_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = copy_tokenizer(tokenizer_from, out)
    config = T.GemmaConfig(**dict(_TEXT, vocab_size=PADDED_VOCAB), eos_token_id=eos, hidden_act="gelu",
                           tie_word_embeddings=False, initializer_range=_GEMMA_STD)
    torch.manual_seed(seed)
    model = T.GemmaForCausalLM(config).to(torch.float32).eval()
    _randomise(model, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@dataclass
class PaliGemmaReference:
    input_ids: list[int]
    logits: torch.Tensor  # (L, vocab) float32, every prompt position
    greedy: list[int]  # new tokens of greedy `generate`
    inputs: dict  # what the model was called with


def paligemma_inputs(processor, prompt: str, images: list) -> dict:
    """The model inputs transformers builds for `prompt` with `images` (the processor; for a text-only prompt,
    which the processor refuses, the tokenizer's ids with token types 0: the whole prompt is the prefix)."""
    if images:
        inputs = dict(processor(text=prompt, images=list(images), return_tensors="pt"))
        inputs.pop("labels", None)  # the processor's training labels (all ignored without a suffix)
        return inputs
    ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def paligemma_reference(model, processor, prompt: str, images: list, max_new_tokens: int = 8,
                        inputs: dict | None = None) -> PaliGemmaReference:
    """transformers (fp32, CPU) on `prompt` with `images`, or on ready `inputs`: every prompt position's logits
    and greedy `generate`."""
    inputs = inputs if inputs is not None else paligemma_inputs(processor, prompt, images)
    assert not inputs["token_type_ids"].any(), "the whole prompt is PaliGemma's prefix"
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    n = inputs["input_ids"].shape[1]
    return PaliGemmaReference(inputs["input_ids"][0].tolist(), logits, out[0, n:].tolist(), inputs)


__all__ = ["IMAGE_TOKEN", "IMAGE_TOKEN_ID", "VOCAB", "WINDOW", "TOKENS_PER_IMAGE", "build_tiny_paligemma",
           "build_tiny_gemma", "load_hf", "paligemma_inputs", "paligemma_reference", "PaliGemmaReference"]
