"""Benchmark prompts of an exact token length for the target model's tokenizer.

Random prompts are built from words that are single tokens with a leading space (" the", " house", ...), so the
text tokenizes back to exactly the requested count; a shared prefix (same words for every prompt) exercises prefix
caching. A dataset file (one prompt per line, or JSONL with a "prompt" field) is cut or repeated to length.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import PreTrainedTokenizerBase


def _single_token_words(tokenizer: PreTrainedTokenizerBase, limit: int = 20000) -> list[str]:
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([token])
        if text.startswith(" ") and text[1:].isalpha() and text[1:].isascii() and len(text) > 2:
            words.append(text)
            if len(words) >= limit:
                break
    if len(words) < 100:
        raise ValueError("could not find enough single-token words in this tokenizer for random prompts")
    return words


def _fit(tokenizer: PreTrainedTokenizerBase, text: str, n_tokens: int, filler: list[str], rng: random.Random) -> str:
    """Trim or extend `text` until it is exactly `n_tokens` tokens (no special tokens added)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < n_tokens:
        text += rng.choice(filler)
        ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > n_tokens:
        text = tokenizer.decode(ids[:n_tokens])
        ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != n_tokens:
        raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens (got {len(ids)})")
    return text


def random_prompts(tokenizer: PreTrainedTokenizerBase, num: int, prompt_tokens: int, shared_prefix_tokens: int = 0,
                   seed: int = 0) -> list[str]:
    if shared_prefix_tokens >= prompt_tokens:
        raise ValueError("--shared-prefix-tokens must be smaller than --prompt-tokens")
    rng = random.Random(seed)
    words = _single_token_words(tokenizer)
    prefix = "".join(rng.choice(words) for _ in range(shared_prefix_tokens))
    prefix = _fit(tokenizer, prefix, shared_prefix_tokens, words, rng) if shared_prefix_tokens else ""
    out = []
    for _ in range(num):
        body = "".join(rng.choice(words) for _ in range(prompt_tokens - shared_prefix_tokens))
        out.append(_fit(tokenizer, prefix + body, prompt_tokens, words, rng))
    return out


def dataset_prompts(path: str | Path, tokenizer: PreTrainedTokenizerBase, num: int, prompt_tokens: int | None,
                    seed: int = 0) -> list[str]:
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    texts = [json.loads(ln)["prompt"] if ln.lstrip().startswith("{") else ln for ln in lines]
    rng = random.Random(seed)
    chosen = [texts[i % len(texts)] for i in range(num)]
    rng.shuffle(chosen)
    if prompt_tokens is None:
        return chosen
    words = _single_token_words(tokenizer)
    return [_fit(tokenizer, t, prompt_tokens, words, rng) for t in chosen]
