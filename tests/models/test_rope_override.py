"""TGI's `--rope-scaling` / `--rope-factor` over a checkpoint's own rope config: Loom with the override matches
transformers given the same scaling in its config (linear: logits at every position; dynamic NTK: greedy generation
past the pretraining length, token by token as transformers recomputes it), and the longest sequence grows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.testing.parity import hf_model, paged_logits, random_prompts
from loom.testing.tiny_models import make_tiny_checkpoint
from loom.worker.runner import ModelRunner

MAX_POS = 64


@pytest.fixture(scope="module")
def short_llama(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("rope-llama"), "llama", tokenizer_from=tokenizer_dir,
                                max_position_embeddings=MAX_POS)


def _with_rope(src, dst, kind: str, factor: float):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_parameters"] = {"rope_type": kind, "factor": factor, "rope_theta": theta}
    cfg.pop("rope_scaling", None)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_linear_override_matches_transformers_logits(short_llama, tmp_path):
    hf = hf_model(_with_rope(short_llama, tmp_path / "linear", "linear", 2.0))
    config = ModelConfig.from_dir(short_llama, "float32", rope=("linear", 2.0))
    assert config.max_model_len == 2 * MAX_POS
    runner = ModelRunner(config, num_blocks=12, block_size=16)
    kv = KVCacheManager(12, 16, enable_prefix_caching=False)
    for ids in random_prompts([20, 100], 50257, seed=60):
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        for chunk in (len(ids), 7, 1):
            got = paged_logits(runner, kv, ids, chunk)
            assert (got - expected).abs().max().item() < 1e-4, (len(ids), chunk)
    # without the override the rotations differ
    plain = ModelRunner(ModelConfig.from_dir(short_llama, "float32"), num_blocks=12, block_size=16)
    ids = random_prompts([40], 50257, seed=61)[0]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert (paged_logits(plain, kv, ids, len(ids)) - expected).abs().max().item() > 1e-2


def test_dynamic_override_matches_transformers_generation_past_the_pretraining_length(short_llama, tmp_path):
    hf = hf_model(_with_rope(short_llama, tmp_path / "dynamic", "dynamic", 2.0))
    llm = LLM(short_llama, dtype="float32", max_batch_total_tokens=1024, rope_scaling="dynamic", rope_factor=2.0)
    assert llm.engine.max_total_tokens == 2 * MAX_POS
    prompt = random_prompts([40], 50257, seed=62)[0]
    got = llm.generate([prompt], SamplingParams(max_new_tokens=60))[0].token_ids  # positions 40..99 cross 64
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False)
    assert got == out[0, len(prompt):].tolist()


def test_factor_alone_is_linear_and_scaling_needs_a_factor(short_llama):
    from loom.launcher_args import resolve

    llm = LLM(short_llama, dtype="float32", max_batch_total_tokens=512, rope_factor=2.0)
    assert llm.engine.model_config.hf_config["rope_parameters"]["rope_type"] == "linear"
    with pytest.raises(ValueError, match="--rope-scaling dynamic needs --rope-factor"):
        LLM(short_llama, dtype="float32", max_batch_total_tokens=512, rope_scaling="dynamic")
    with pytest.raises(SystemExit, match="`--rope-scaling` needs `--rope-factor`"):
        resolve(["--rope-scaling", "linear"], environ={})
    args = resolve([], environ={"ROPE_SCALING": "dynamic", "ROPE_FACTOR": "4"})
    assert (args["rope_scaling"], args["rope_factor"]) == ("dynamic", 4.0)
