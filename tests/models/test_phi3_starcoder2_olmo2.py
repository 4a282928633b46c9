"""Phi-3 (incl. Phi-4-mini partial rotary and LongRoPE), StarCoder2 and OLMo 2 against transformers, float32.

Each family gets a tiny random checkpoint built from its real transformers config class; logits are compared at
every position (one prefill, chunks over cached blocks, token-by-token decode) with prompts longer than any
sliding window, and greedy generation through `loom.LLM` is compared with transformers' `generate`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loom import LLM
from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.testing.parity import (
    assert_greedy_parity,
    assert_logits_parity,
    hf_model,
    make_checkpoint,
    paged_logits,
    random_prompts,
)
from loom.testing.tiny_models import PADDED_VOCAB
from loom.worker.runner import ModelRunner

BLOCK = 16
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": PADDED_VOCAB, "initializer_range": 0.1, "bos_token_id": 50256,
        "eos_token_id": 50258}  # 50258: the test tokenizer's <|im_end|>
# LongRoPE at toy scale: every sequence of the greedy test (≤ 88 tokens) stays below the pretraining length.
ORIGINAL_MAX = 128
# Phi-4-mini's shape: 3/4 of each 16-wide head rotates, so the factor lists have 6 entries.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0], "long_factor": [1.5, 2.5, 4.0, 6.0, 9.0, 14.0]}


def _phi3(**overrides):
    from transformers import Phi3Config

    return Phi3Config(**{**TINY, "max_position_embeddings": 2048, "pad_token_id": 50256, **overrides})


def _starcoder2(**overrides):
    from transformers import Starcoder2Config

    return Starcoder2Config(**{**TINY, "max_position_embeddings": 2048, **overrides})


def _olmo2(**overrides):
    from transformers import Olmo2Config

    return Olmo2Config(**{**TINY, "max_position_embeddings": 2048, "pad_token_id": 50256, **overrides})


# name → (config, run the greedy test too). Greedy generation is the slow half, so variants that only change
# weights' layout (untied, no biases) check logits alone.
CONFIGS = {
    "phi3-swa": (lambda: _phi3(sliding_window=24), True),
    "phi4-mini-longrope": (lambda: _phi3(
        partial_rotary_factor=0.75, tie_word_embeddings=True, max_position_embeddings=4 * ORIGINAL_MAX,
        original_max_position_embeddings=ORIGINAL_MAX, rope_parameters=dict(LONGROPE),
    ), True),
    "starcoder2-swa": (lambda: _starcoder2(sliding_window=24, hidden_act="gelu_pytorch_tanh"), True),  # tied
    "starcoder2-untied-nobias": (lambda: _starcoder2(tie_word_embeddings=False, use_bias=False), False),
    "olmo2": (lambda: _olmo2(), True),
}
LENGTHS = (1, 7, 40)  # 40 > every sliding window above
GREEDY = {"lengths": (3, 17, 40), "new_tokens": 16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            cache[name] = make_checkpoint(tmp_path_factory.mktemp(name), CONFIGS[name][0](), tokenizer_dir)
        return cache[name]

    return make


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, checkpoint):
    assert_logits_parity(checkpoint(name), lengths=LENGTHS)


@pytest.mark.parametrize("name", [n for n, (_, greedy) in CONFIGS.items() if greedy])
def test_greedy_generation_matches_transformers(name, checkpoint):
    assert_greedy_parity(checkpoint(name), **GREEDY)


def test_longrope_past_the_pretraining_length(checkpoint):
    """Past `original_max_position_embeddings` the long factors apply to the new positions only (see
    `loom.layers.rotary._longrope_tables`): exactly transformers' cached forward fed the first ORIGINAL_MAX tokens,
    then the rest. A single transformers forward over the whole prompt (long factors everywhere) differs."""
    path = checkpoint("phi4-mini-longrope")
    ids = random_prompts([ORIGINAL_MAX + 22], 50257, seed=4)[0]
    hf = hf_model(path)
    with torch.no_grad():
        head = hf(torch.tensor([ids[:ORIGINAL_MAX]]), use_cache=True)
        tail = hf(torch.tensor([ids[ORIGINAL_MAX:]]), past_key_values=head.past_key_values)
        expected = torch.cat([head.logits[0], tail.logits[0]]).float()
        all_long = hf(torch.tensor([ids])).logits[0].float()
    num_blocks = -(-len(ids) // BLOCK) + 1
    runner = ModelRunner(ModelConfig.from_dir(path, "float32"), num_blocks=num_blocks, block_size=BLOCK)
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=False)
    for chunk in (len(ids), 5, 1):
        got = paged_logits(runner, kv, ids, chunk)
        assert (got - expected).abs().max().item() <= 1e-4, chunk
    assert (got - all_long).abs().max().item() > 1e-2  # the factor choice is visible: this test can tell


def _edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name, changes, message", [
    ("phi3-swa", {"hidden_act": "gelu"}, "Unsupported hidden_act 'gelu'"),
    ("starcoder2-untied-nobias", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "Unsupported rope scaling type 'yarn'"),
    ("starcoder2-untied-nobias", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("olmo2", {"hidden_act": "relu"}, "Unsupported hidden_act 'relu'"),
])
def test_unsupported_config_is_a_clear_error(name, changes, message, checkpoint, tmp_path):
    bad = _edited(checkpoint(name), tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=message):
        LLM(bad, max_batch_total_tokens=256)


def test_unknown_checkpoint_tensor_is_a_clear_error(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _edited(checkpoint("olmo2"), tmp_path / "extra")
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.0.self_attn.q_bias_typo"] = torch.zeros(4)
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(ValueError, match="q_bias_typo"):
        LLM(bad, max_batch_total_tokens=256)
