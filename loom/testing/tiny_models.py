"""Tiny random checkpoints of real architectures, built with `transformers`, for tests and the offline demo.

Weights are random (seeded), so the text they produce is gibberish; what matters is that every architecture's
config, weight names and tokenizer are the real ones. The tokenizer is GPT-2's byte-level BPE (vocabulary shipped in
`loom/assets/gpt2`, MIT licence) plus ChatML special tokens and a ChatML chat template, like the shared bench model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

GPT2_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "gpt2"
PADDED_VOCAB = 50304  # GPT-2's 50257 + ChatML tokens, padded to a multiple of 64 like the bench model
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_DIMS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=2048, vocab_size=PADDED_VOCAB,
)


def save_gpt2_tokenizer(out_dir: str | Path) -> int:
    """Write a GPT-2 + ChatML tokenizer to `out_dir`; returns the `<|im_end|>` id (the EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = json.loads((GPT2_ASSETS / "encoder.json").read_text(encoding="utf-8"))
    lines = (GPT2_ASSETS / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return int(fast.convert_tokens_to_ids("<|im_end|>"))


def copy_tokenizer(src: str | Path, out: Path) -> int:
    """Copy a tokenizer made by `save_gpt2_tokenizer`; returns the `<|im_end|>` id (the EOS)."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, out / name)
    return _token_id(out, "<|im_end|>")


def _token_id(tokenizer_dir: Path, token: str) -> int:
    added = json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    return next(int(t["id"]) for t in added if t["content"] == token)


def _config(arch: str, eos_id: int, overrides: dict[str, Any]):
    import transformers

    kinds = {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", {"sliding_window": None}),
        "qwen2": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", {"head_dim": 16}),
    }
    if arch not in kinds:
        raise ValueError(f"no tiny recipe for {arch!r}; have {sorted(kinds)}")
    cls_name, extra = kinds[arch]
    fields = {**TINY_DIMS, **extra, "bos_token_id": 50256, "eos_token_id": eos_id,
              "initializer_range": 0.1, "tie_word_embeddings": False, **overrides}
    return getattr(transformers, cls_name)(**fields)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_tiny_checkpoint(
    out_dir: str | Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
    tokenizer_from: str | Path | None = None, **overrides: Any,
) -> Path:
    """Save a random `arch` model (safetensors) with the GPT-2 tokenizer into `out_dir`; returns the path.
    `tokenizer_from`: a directory made by `save_gpt2_tokenizer` to copy instead of building the tokenizer again."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        eos_id = copy_tokenizer(tokenizer_from, out)
    else:
        eos_id = save_gpt2_tokenizer(out)
    config = _config(arch, eos_id, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
