"""Every model family against transformers (the oracle) on tiny random checkpoints, float32.

Logits are compared at every position, with the prompt computed three ways over the paged KV cache: in one
prefill, in chunks that attend to cached blocks, and one token at a time through the decode path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loom import LLM, SamplingParams
from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.protocol.plan import SeqPlan, StepPlan
from loom.worker.runner import ModelRunner

from ..conftest import TINY_MODELS

BLOCK = 16


def _hf_model(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _paged_logits(runner: ModelRunner, kv: KVCacheManager, ids: list[int], chunk: int) -> torch.Tensor:
    assert kv.allocate("r", len(ids))
    try:
        out = []
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            seq = SeqPlan("r", piece, start, kv.block_ids("r"), sample=False, all_logits=True)
            out.append(runner.execute(StepPlan([seq], BLOCK)))
        return torch.cat(out)
    finally:
        kv.free("r")


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_logits_match_transformers(name, tiny_model_factory):
    path = tiny_model_factory(name)
    hf = _hf_model(path)
    runner = ModelRunner(ModelConfig.from_dir(path, "float32"), num_blocks=32, block_size=BLOCK)
    kv = KVCacheManager(32, BLOCK, enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(1)
    for length in (1, 7, 33, 100):
        ids = torch.randint(0, 50257, (length,), generator=gen).tolist()
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        for chunk in (length, 5, 1):
            got = _paged_logits(runner, kv, ids, chunk)
            diff = (got - expected).abs().max().item()
            assert diff <= 1e-4, f"{name}: length {length}, chunk {chunk}: max abs diff {diff}"
    kv.check_integrity()


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_greedy_generation_matches_transformers(name, tiny_model_factory):
    path = tiny_model_factory(name)
    hf = _hf_model(path)
    llm = LLM(path, dtype="float32", max_batch_total_tokens=2048)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    results = llm.generate(prompts, SamplingParams(max_new_tokens=32))
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        expected = out[0, len(prompt) :].tolist()
        assert result.token_ids == expected, name
        assert result.finish_reason == ("length" if len(expected) == 32 else "eos_token")
    llm.engine.check_integrity()


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
    expected = _paged_logits(ref_runner, KVCacheManager(8, BLOCK, False), ids, 40)
    for chunk in (40, 1):
        got = _paged_logits(runner, KVCacheManager(8, BLOCK, False), ids, chunk)
        assert (got - expected).abs().max().item() < 0.1, chunk
