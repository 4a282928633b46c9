"""Gemma 2 and Gemma 3 (text) against transformers on tiny random checkpoints, float32.

The configs use a 16-token sliding window on alternate layers, so a 40-token prompt, prefill chunks of
5 tokens and decodes all cross the window boundary. Gemma 2's soft-caps are small enough that tanh saturates
(attention scores and logits both reach the cap), so a missing or misplaced cap shows up far above tolerance.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from loom import LLM
from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.models.gemma3 import gemma3_ropes
from loom.testing.parity import assert_greedy_parity, assert_logits_parity, make_checkpoint, paged_logits
from loom.testing.tiny_models import PADDED_VOCAB
from loom.worker.runner import ModelRunner

WINDOW = 16
DIMS = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048, "vocab_size": PADDED_VOCAB,
    "initializer_range": 0.1, "bos_token_id": 50256, "eos_token_id": 50258, "sliding_window": WINDOW,
    "query_pre_attn_scalar": 24,
}
LENGTHS = (1, 7, 40)
CHUNKS = (None, 5, 1)


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory, tokenizer_dir):
    config = transformers.Gemma2Config(**DIMS, attn_logit_softcapping=1.0, final_logit_softcapping=2.0)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    return make_checkpoint(tmp_path_factory.mktemp("gemma2"), config, tokenizer_dir)


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory, tokenizer_dir):
    config = transformers.Gemma3TextConfig(
        **DIMS, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
    )
    return make_checkpoint(tmp_path_factory.mktemp("gemma3"), config, tokenizer_dir)


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_gemma2_logits_match_transformers(gemma2_dir):
    assert_logits_parity(gemma2_dir, lengths=LENGTHS, chunks=CHUNKS)


def test_gemma2_greedy_generation_matches_transformers(gemma2_dir):
    assert_greedy_parity(gemma2_dir)


def test_gemma3_logits_match_transformers(gemma3_dir):
    assert_logits_parity(gemma3_dir, lengths=LENGTHS, chunks=CHUNKS)


def test_gemma3_greedy_generation_matches_transformers(gemma3_dir):
    assert_greedy_parity(gemma3_dir)


def test_gemma3_pre_v5_config_matches_transformers(gemma3_dir, tmp_path):
    """A config.json as transformers 4.x wrote it: flat rope keys, `sliding_window_pattern`, no `layer_types`,
    and a final logit soft-cap."""
    old = _edit_config(
        gemma3_dir, tmp_path / "old", rope_parameters=None, layer_types=None, _sliding_window_pattern=None,
        rope_theta=100000.0, rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
        sliding_window_pattern=2, final_logit_softcapping=3.0,
    )
    assert_logits_parity(old, lengths=(40,), chunks=(None, 7, 1))


@pytest.mark.parametrize("old", [
    {},
    {"rope_theta": 2e6, "rope_local_base_freq": 2e4},
    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}},
])
def test_gemma3_rope_parameters_read_like_transformers(old):
    expected = transformers.Gemma3TextConfig(num_hidden_layers=2, **json.loads(json.dumps(old))).rope_parameters
    assert gemma3_ropes(old) == expected


def test_gemma2_half_precision_tracks_float32(gemma2_dir):
    """bfloat16 through the explicit soft-capped attention (prefill and decode) stays close to float32."""
    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = ModelRunner(ModelConfig.from_dir(gemma2_dir, "float32"), num_blocks=4, block_size=16)
    runner = ModelRunner(ModelConfig.from_dir(gemma2_dir, "bfloat16"), num_blocks=4, block_size=16)
    expected = paged_logits(ref, KVCacheManager(4, 16, False), ids, 40)
    for chunk in (40, 1):
        got = paged_logits(runner, KVCacheManager(4, 16, False), ids, chunk)
        assert (got - expected).abs().max().item() < 0.1, chunk


@pytest.mark.parametrize(("which", "change", "message"), [
    ("gemma3", {"attn_logit_softcapping": 50.0}, "Gemma 3 does not soft-cap attention scores"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention"]}, r"Unsupported layer types \['chunked"),
    ("gemma3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "keyed by layer type"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "not-a-rope", "factor": 4.0},
                                    "sliding_attention": {"rope_type": "default"}}}, "Unsupported rope scaling"),
])
def test_unsupported_options_are_clear_errors(which, change, message, gemma2_dir, gemma3_dir, tmp_path):
    bad = _edit_config(gemma2_dir if which == "gemma2" else gemma3_dir, tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=message):
        LLM(bad, max_batch_total_tokens=256)
