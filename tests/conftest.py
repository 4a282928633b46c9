"""Shared fixtures: tiny random checkpoints of each supported family, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.layers.kernels.build import prebuild
from loom.testing.tiny_models import make_tiny_checkpoint, save_gpt2_tokenizer

# The C++ CPU kernels, compiled side by side before test modules that need them are collected (a minute each on a
# new machine, one after the other otherwise; loaded from the cache afterwards). With LOOM_REQUIRE_KERNELS=1 (CI) a
# kernel that fails to build raises here, and the whole run stops with the compiler's message.
prebuild()

# name → (transformers family, config overrides). Each is a real architecture's config at toy size.
TINY_MODELS = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    "mistral-swa": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt2-tokenizer")
    save_gpt2_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer_dir):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            arch, overrides = TINY_MODELS[name]
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            cache[name] = make_tiny_checkpoint(out, arch, tokenizer_from=tokenizer_dir, **overrides)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def llama_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")
