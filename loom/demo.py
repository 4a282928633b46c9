"""The model `loom launch` serves when no --model-id is given: a small Llama with RANDOM weights.

It exists so that the server starts on a machine without network access. Its output is gibberish. It is built
once with `transformers` (seed 0; 4 layers, hidden 256, GPT-2 vocabulary + ChatML) into
$LOOM_CACHE (default ~/.cache/loom) and reused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
DEMO_MODEL_ID = "loom-demo/tiny-random-llama"
_DIMS = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.05)


def ensure_demo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir or os.environ.get("LOOM_CACHE") or Path.home() / ".cache" / "loom")
    out = root / "demo-tiny-random-llama-v1"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from loom.testing.tiny_models import make_tiny_checkpoint

    logger.warning("no --model-id given: building the demo model %s (RANDOM weights, gibberish output) in %s",
                   DEMO_MODEL_ID, out)
    tmp = out.with_name(out.name + ".partial")
    make_tiny_checkpoint(tmp, "llama", seed=0, **_DIMS)
    tmp.rename(out)
    return out
