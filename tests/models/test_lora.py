"""LoRA adapters (`--lora-adapters`, per-request `adapter_id`): a random PEFT adapter on the tiny Llama gives the
tokens of the checkpoint with the adapter merged into its weights (W + scale · B A: the oracle, itself checked
against transformers by the parity tests), in a batch mixing adapters and the base model; prefix-cache blocks are
never shared across adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom import LLM, SamplingParams
from loom.testing.parity import hf_model, random_prompts

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(out, llama_dir, rank: int = 4, alpha: float = 16.0, seed: int = 0, rslora: bool = False):
    """A PEFT LoRA adapter over every projection of every layer, and the checkpoint with it merged."""
    state = load_file(str(llama_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    scale = alpha / (rank ** 0.5 if rslora else rank)
    tensors, merged = {}, dict(state)
    for name, weight in state.items():
        module = name.removesuffix(".weight")
        if not any(module.endswith(t) for t in TARGETS):
            continue
        a = torch.randn(rank, weight.shape[1], generator=g) * 0.05
        b = torch.randn(weight.shape[0], rank, generator=g) * 0.05
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        merged[name] = weight + scale * (b @ a)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": list(TARGETS), "base_model_name_or_path": str(llama_dir)}))
    merged_dir = out.parent / f"{out.name}-merged"
    shutil.copytree(llama_dir, merged_dir)
    save_file(merged, str(merged_dir / "model.safetensors"))
    return out, merged_dir


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"one": make_adapter(root / "one", llama_dir, seed=1),
            "two": make_adapter(root / "two", llama_dir, rank=8, alpha=8.0, seed=2, rslora=True)}


def test_adapters_match_their_merged_checkpoints_in_one_batch(llama_dir, adapters):
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096,
              lora_adapters=(("one", str(adapters["one"][0])), ("two", str(adapters["two"][0]))))
    prompts = random_prompts([6, 21, 13], 50257, seed=80)
    params = [SamplingParams(max_new_tokens=16, adapter_id="one"), SamplingParams(max_new_tokens=16),
              SamplingParams(max_new_tokens=16, adapter_id="two")]
    got = [r.token_ids for r in llm.generate(prompts, params)]
    expected = []
    for prompt, adapter in zip(prompts, ("one", None, "two")):
        path = adapters[adapter][1] if adapter else llama_dir
        with torch.no_grad():
            out = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    assert got == expected
    assert got[0] != [r.token_ids for r in llm.generate(prompts[:1], SamplingParams(max_new_tokens=16))][0]
    llm.engine.check_integrity()


def test_prefix_cache_is_per_adapter_and_unknown_ids_run_the_base_model(llama_dir, adapters):
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096,
              lora_adapters=(("one", str(adapters["one"][0])),))
    prompt = random_prompts([40], 50257, seed=81)[0]
    base = llm.generate([prompt], SamplingParams(max_new_tokens=8))[0].token_ids
    stats = llm.engine.scheduler.stats
    hits = stats.num_prefix_hit_tokens
    one = llm.generate([prompt], SamplingParams(max_new_tokens=8, adapter_id="one"))[0].token_ids
    assert stats.num_prefix_hit_tokens == hits  # the base model's blocks do not serve the adapter
    assert llm.generate([prompt], SamplingParams(max_new_tokens=8, adapter_id="one"))[0].token_ids == one
    assert stats.num_prefix_hit_tokens > hits  # but the adapter's own do
    assert llm.generate([prompt], SamplingParams(max_new_tokens=8, adapter_id="nope"))[0].token_ids == base


def test_bad_adapters_are_clear_errors(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        LLM(llama_dir, max_batch_total_tokens=512, lora_adapters=(("x", str(tmp_path)),))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.model.layers.0.mlp.nonexistent.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.model.layers.0.mlp.nonexistent.lora_B.weight": torch.zeros(8, 2)},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no linear layer of this model"):
        LLM(llama_dir, max_batch_total_tokens=512, lora_adapters=(("bad", str(bad)),))


def test_launcher_flag(adapters):
    from loom.launcher import resolve_lora_adapters

    one, two = str(adapters["one"][0]), str(adapters["two"][0])
    assert resolve_lora_adapters(f"first={one}, {two}") == (("first", one), (two, two))
