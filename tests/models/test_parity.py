"""Every model family against transformers (the oracle) on tiny random checkpoints, float32.

Logits are compared at every position, with the prompt computed three ways over the paged KV cache: in one
prefill, in chunks that attend to cached blocks, and one token at a time through the decode path.
"""

from __future__ import annotations

import pytest
import torch

from loom import LLM
from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.testing.parity import assert_greedy_parity, assert_logits_parity, paged_logits
from loom.worker.runner import ModelRunner

from ..conftest import TINY_MODELS

BLOCK = 16


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_logits_match_transformers(name, tiny_model_factory):
    assert_logits_parity(tiny_model_factory(name))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_greedy_generation_matches_transformers(name, tiny_model_factory):
    assert_greedy_parity(tiny_model_factory(name))


def test_unknown_architecture_is_a_clear_error(llama_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"Unsupported model architecture 'FancyNewForCausalLM'.*LlamaForCausalLM"):
        LLM(bad, max_batch_total_tokens=256)


def test_unsupported_rope_type_is_a_clear_error(llama_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "yarn"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "su-something", "rope_theta": 10000.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unsupported rope scaling type 'su-something'"):
        LLM(bad, max_batch_total_tokens=256)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_float32(llama_dir, dtype):
    """Half-precision paths (including fp32 decode attention on CPU) stay close to the fp32 logits."""
    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    ref_runner = ModelRunner(ModelConfig.from_dir(llama_dir, "float32"), num_blocks=8, block_size=BLOCK)
    runner = ModelRunner(ModelConfig.from_dir(llama_dir, dtype), num_blocks=8, block_size=BLOCK)
    assert runner.kv_caches[0].dtype == getattr(torch, dtype)
    expected = paged_logits(ref_runner, KVCacheManager(8, BLOCK, False), ids, 40)
    for chunk in (40, 1):
        got = paged_logits(runner, KVCacheManager(8, BLOCK, False), ids, chunk)
        assert (got - expected).abs().max().item() < 0.1, chunk
