"""Tiny random vision-language checkpoints of real architectures, built offline with `transformers`.

Each family is saved by `save_pretrained`: `config.json`, `model.safetensors` (float32, the key names transformers
5 writes; for CLIP/SigLIP towers that is `vision_tower.encoder...`, where Hub checkpoints have
`vision_tower.vision_model.encoder...` -- transformers loads both), `generation_config.json`
and a full processor (tokenizer + image processor + `processor_config.json` + `chat_template.jinja`), so that
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)` load it (Qwen2-VL,
Qwen2.5-VL and SmolVLM: see `load_processor`). Weights are random (seeded) with no constant tensors left (norm
weights, biases and zero-initialised projections get noise too), so a loader that drops or mixes up any tensor changes
the logits.

The tokenizer is GPT-2's byte-level BPE (`loom/assets/gpt2`) with ids 50257/50258 = `<|im_start|>`/`<|im_end|>`
(like `tiny_models`), followed by the family's special image tokens; `vocab_size` stays 50304.

`hf_reference` runs the transformers model as the oracle: the processor's tensors, every position's logits and the
greedy continuation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loom.testing.tiny_models import GPT2_ASSETS, PADDED_VOCAB

VLM_FAMILIES: tuple[str, ...] = ("llava", "llava_next", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "gemma3")

BOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
INIT_STD = 0.1

# A ChatML template that also accepts OpenAI-style content lists (text parts and image parts), so
# `processor.apply_chat_template` works; `{image}` is replaced by the family's one-image placeholder.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}{image}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The tokens each family's processor and model need, after <|im_start|> and <|im_end|> (ids from 50259 on).
_IDEFICS3_ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
FAMILY_TOKENS: dict[str, list[str]] = {
    "llava": ["<image>"],
    "llava_next": ["<image>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_IDEFICS3_ROW_COL],
    "smolvlm": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_IDEFICS3_ROW_COL],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
}
# Named tokenizer attributes (saved in tokenizer_config.json) that the processors read.
_NAMED_TOKENS: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "idefics3": {},
    # SmolVLM's processor reads its tokens from the tokenizer (as SmolVLM2's tokenizer_config.json names them)
    "smolvlm": {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    "qwen2_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    "qwen2_5_vl": {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
}

# Text model (Llama-like) at toy size: head_dim 16, GQA 4:2.
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, vocab_size=PADDED_VOCAB, initializer_range=INIT_STD,
             tie_word_embeddings=False)
# CLIP / SigLIP-like vision towers: 32x32 pixels, 8x8 patches -> a 4x4 patch grid.
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8, num_channels=3)


# --------------------------------------------------------------------------------------------------- tokenizer
def _tokenizer(family: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = json.loads((GPT2_ASSETS / "encoder.json").read_text(encoding="utf-8"))
    lines = (GPT2_ASSETS / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = [IM_START, IM_END, *FAMILY_TOKENS[family]]
    # Added in this order so the ids are fixed: 50257, 50258, ...
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, unk_token=BOS, pad_token=BOS,
        extra_special_tokens=dict(_NAMED_TOKENS[family]) or None,
    )
    fast.add_special_tokens({"additional_special_tokens": extra})
    for i, t in enumerate(extra):
        assert fast.convert_tokens_to_ids(t) == 50257 + i, (t, fast.convert_tokens_to_ids(t))
    assert len(fast) <= PADDED_VOCAB
    return fast


def token_id(family: str, token: str) -> int:
    """The id `build_tiny_vlm(family, ...)` gives to a special token."""
    return 50257 + [IM_START, IM_END, *FAMILY_TOKENS[family]].index(token)


# ------------------------------------------------------------------------------------------------ per family
def _llava(tok, template: str, next_: bool):
    import transformers as T

    vision = T.CLIPVisionConfig(**_VISION, projection_dim=32, initializer_range=INIT_STD)
    text = T.LlamaConfig(**_TEXT, bos_token_id=50256, eos_token_id=token_id("llava", IM_END), pad_token_id=50256)
    image_id = tok.convert_tokens_to_ids("<image>")
    common = dict(vision_config=vision, text_config=text, image_token_index=image_id, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu",
                  image_seq_length=(32 // 8) ** 2, tie_word_embeddings=False)
    proc_kwargs = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       image_token="<image>")
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    if not next_:
        config = T.LlavaConfig(**common)
        image_processor = T.CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
            image_mean=mean, image_std=std)
        processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                     **proc_kwargs)
        return config, processor, T.LlavaForConditionalGeneration
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = T.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    image_processor = T.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
        do_center_crop=True, do_pad=True, image_mean=mean, image_std=std)
    processor = T.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                     **proc_kwargs)
    return config, processor, T.LlavaNextForConditionalGeneration


def _idefics3(tok, template: str):
    import transformers as T

    vision = T.Idefics3VisionConfig(**_VISION, initializer_range=INIT_STD)
    text = T.LlamaConfig(**_TEXT, bos_token_id=50256, eos_token_id=token_id("idefics3", IM_END), pad_token_id=50256)
    scale_factor = 2
    image_seq_len = ((32 // 8) ** 2) // scale_factor**2  # 4 tokens per 32x32 tile
    config = T.Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale_factor,
                              image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
                              pad_token_id=50256)
    image_processor = T.Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    processor = T.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=image_seq_len,
                                    chat_template=template)
    return config, processor, T.Idefics3ForConditionalGeneration


def _smolvlm(tok, template: str):
    """Idefics3's architecture under SmolVLM's classes, at the idefics3 family's sizes (4 tokens per 32x32 tile)."""
    import transformers as T

    vision = T.SmolVLMVisionConfig(**_VISION, initializer_range=INIT_STD)
    text = T.LlamaConfig(**_TEXT, bos_token_id=50256, eos_token_id=token_id("smolvlm", IM_END), pad_token_id=50256)
    scale_factor = 2
    image_seq_len = ((32 // 8) ** 2) // scale_factor**2
    config = T.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=scale_factor,
                             image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
                             pad_token_id=50256)
    image_processor = T.SmolVLMImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    # SmolVLMProcessor cannot be built here: its video processor needs torchvision and its init requires num2words
    # (for video prompts). So it is a plain record, written by `_save_processor_record` (see `load_processor`).
    processor = {"processor_class": "SmolVLMProcessor", "image_processor": image_processor, "tokenizer": tok,
                 "chat_template": template, "kwargs": {"image_seq_len": image_seq_len}}
    return config, processor, T.SmolVLMForConditionalGeneration


def _qwen2_vl(tok, template: str, v25: bool):
    import transformers as T

    family = "qwen2_5_vl" if v25 else "qwen2_vl"
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    # head_dim 16 -> 8 rotary frequencies split (temporal, height, width).
    text = dict(_TEXT, bos_token_id=50256, eos_token_id=token_id(family, IM_END), pad_token_id=50256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    # 8x8 patches, 2x2 merge: one LLM token per 16x16 pixels.
    vision_common = dict(depth=2, num_heads=4, in_channels=3, patch_size=8, spatial_merge_size=2,
                         temporal_patch_size=2, initializer_range=INIT_STD)
    if v25:
        vision = dict(vision_common, depth=4, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                      window_size=32, fullatt_block_indexes=[1, 3], hidden_act="silu", tokens_per_second=2)
        config = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        cls = T.Qwen2_5_VLForConditionalGeneration
        proc_cls = T.Qwen2_5_VLProcessor
    else:
        vision = dict(vision_common, embed_dim=32, hidden_size=64, mlp_ratio=2, hidden_act="quick_gelu")
        config = T.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        cls = T.Qwen2VLForConditionalGeneration
        proc_cls = T.Qwen2VLProcessor
    image_processor = T.Qwen2VLImageProcessorPil(
        min_pixels=16 * 16 * 4, max_pixels=16 * 16 * 64, patch_size=8, temporal_patch_size=2, merge_size=2)
    # Without torchvision, transformers can neither build nor save a Qwen2-VL processor (its video processor needs
    # torchvision), so the processor is a plain record here, written by `_save_processor_record`.
    processor = {"processor_class": proc_cls.__name__, "image_processor": image_processor, "tokenizer": tok,
                 "chat_template": template}
    return config, processor, cls


def _save_processor_record(processor: dict, out: Path) -> None:
    """Write the files `save_pretrained` writes for a processor transformers cannot build without torchvision
    (processor_config.json with the image processor nested -- for Qwen2-VL and Qwen2.5-VL with a matching video
    processor --, the processor's own arguments, the tokenizer, chat_template.jinja)."""
    image = processor["image_processor"].to_dict()
    cfg = {"image_processor": image, "processor_class": processor["processor_class"], **processor.get("kwargs", {})}
    if processor["processor_class"].startswith("Qwen"):
        image["image_processor_type"] = "Qwen2VLImageProcessor"
        cfg["video_processor"] = {
            "video_processor_type": "Qwen2VLVideoProcessor", "size": dict(image["size"]),
            **{k: image[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                     "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "resample")}}
    (out / "processor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    processor["tokenizer"]._set_processor_class(processor["processor_class"])
    processor["tokenizer"].save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(processor["chat_template"])


def _gemma3(tok, template: str):
    import transformers as T

    vision = T.SiglipVisionConfig(**_VISION, vision_use_head=False)
    text = T.Gemma3TextConfig(
        **dict(_TEXT, initializer_range=INIT_STD, tie_word_embeddings=True), head_dim=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        bos_token_id=50256, eos_token_id=token_id("gemma3", IM_END), pad_token_id=50256,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})
    mm_tokens = 4  # 4x4 patches, average-pooled 2x2 -> 4 tokens
    config = T.Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=mm_tokens,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        initializer_range=INIT_STD, tie_word_embeddings=True)
    image_processor = T.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = T.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=mm_tokens,
                                  chat_template=template)
    return config, processor, T.Gemma3ForConditionalGeneration


_PLACEHOLDERS = {
    "llava": "<image>",
    "llava_next": "<image>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
}


def placeholder_text(family: str, processor=None) -> str:
    """The text standing for ONE image in a prompt, which `processor(text=..., images=[img])` expands."""
    if family == "gemma3" and processor is not None:
        return processor.boi_token
    if family not in _PLACEHOLDERS:
        raise ValueError(f"unknown VLM family {family!r}; have {VLM_FAMILIES}")
    return _PLACEHOLDERS[family]


# ---------------------------------------------------------------------------------------------------- weights
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every (nearly) constant parameter -- norm weights of 1 or 0, zero or 1e-6 biases, zero-initialised
    projections -- so no tensor is degenerate; seeded, independent of the model's own init."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.numel() < 2 or float(p.detach().float().std()) >= 1e-3:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise * INIT_STD)
            else:  # 1-D: norm scales stay near their value (1 for LayerNorm, 0 for Gemma's 1+w), biases small
                mean = float(p.detach().float().mean())
                p.copy_(mean + noise * (0.1 if abs(mean) > 1e-3 else 0.05))


# ------------------------------------------------------------------------------------------------------- build
def build_tiny_vlm(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random `family` VLM with its processor into `out_dir` (created); returns the path."""
    from transformers import GenerationConfig

    if family not in VLM_FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; have {VLM_FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(family)
    template = _CHAT_TEMPLATE.replace("{image}", placeholder_text(family))
    if family in ("llava", "llava_next"):
        config, processor, cls = _llava(tok, template, next_=family == "llava_next")
    elif family == "idefics3":
        config, processor, cls = _idefics3(tok, template)
    elif family == "smolvlm":
        config, processor, cls = _smolvlm(tok, template)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        config, processor, cls = _qwen2_vl(tok, template, v25=family == "qwen2_5_vl")
    else:
        config, processor, cls = _gemma3(tok, template)
    image_id = _image_token_id(config)
    assert image_id == tok.convert_tokens_to_ids(_IMAGE_TOKEN[family]), (image_id, family)

    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    _randomise(model, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    if isinstance(processor, dict):
        _save_processor_record(processor, out)
    else:
        processor.save_pretrained(str(out))
    eos = tok.convert_tokens_to_ids(IM_END)
    GenerationConfig(bos_token_id=50256, eos_token_id=eos, pad_token_id=50256, do_sample=False).save_pretrained(
        str(out))
    return out


_IMAGE_TOKEN = {
    "llava": "<image>", "llava_next": "<image>", "idefics3": "<image>", "smolvlm": "<image>",
    "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "gemma3": "<image_soft_token>",
}


def image_token(family: str) -> str:
    """The token repeated once per image embedding in the expanded input_ids."""
    return _IMAGE_TOKEN[family]


def _image_token_id(config) -> int:
    for key in ("image_token_id", "image_token_index"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise KeyError("no image token id in config")


# ------------------------------------------------------------------------------------------------------ inputs
def test_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB image with structure: per-channel gradients, a disc, and seeded noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy = x / max(width - 1, 1), y / max(height - 1, 1)
    phase = rng.uniform(0, 2 * math.pi)
    r = 255 * fx
    g = 255 * fy
    b = 127.5 * (1 + np.sin(2 * math.pi * (fx + fy) * (1 + seed % 3) + phase))
    img = np.stack([r, g, b], axis=-1)
    cx, cy, rad = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height, 0.25 * min(width, height)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < rad**2
    img[disc] = 255 - img[disc]
    img += rng.normal(0, 20, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


test_image.__test__ = False  # not a pytest test


@dataclass
class HFReference:
    input_ids: torch.Tensor  # (1, L)
    logits: torch.Tensor  # (L, vocab) float32, every prompt position
    greedy: list[int]  # new tokens of greedy generate
    processor_inputs: dict = field(default_factory=dict)  # the processor's output tensors


def load_processor(model_dir: str | Path):
    """The checkpoint's processor as Loom's router loads it (`loom.multimodal.load_processor`: AutoProcessor, or,
    for Qwen2-VL / SmolVLM without torchvision or num2words, the same processor class without its video half).
    The oracle's prompt ids and pixels come from it too: what the tests compare is the model, given the same
    processor outputs."""
    from loom.multimodal import load_processor as loom_load_processor

    return loom_load_processor(model_dir, json.loads((Path(model_dir) / "config.json").read_text()))


def load_hf(model_dir: str | Path):
    """(model, processor) from `model_dir` with transformers, float32 on CPU, eval mode."""
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32,
                                                              output_loading_info=True)
    bad = {k: list(v) for k, v in info.items() if v}
    if bad:  # a key transformers did not map would be silently re-initialised
        raise ValueError(f"{model_dir}: checkpoint does not load cleanly: {bad}")
    return model.eval(), load_processor(model_dir)


def hf_reference(model_dir: str | Path, prompt: str, images: list, max_new_tokens: int = 8,
                 model=None, processor=None) -> HFReference:
    """Run transformers (fp32, CPU) on `prompt` with `images` (none: the processor is called without images):
    the processor's tensors, last-layer logits at every prompt position and `max_new_tokens` greedy tokens
    (fewer if EOS comes first). `model`/`processor`: already loaded from `model_dir`, to skip loading again."""
    if model is None:
        model, loaded_processor = load_hf(model_dir)
        processor = processor if processor is not None else loaded_processor
    elif processor is None:
        processor = load_processor(model_dir)
    inputs = dict(processor(text=prompt, images=list(images) if images else None, return_tensors="pt"))
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    n = inputs["input_ids"].shape[1]
    return HFReference(input_ids=inputs["input_ids"], logits=logits, greedy=out[0, n:].tolist(),
                       processor_inputs=inputs)
