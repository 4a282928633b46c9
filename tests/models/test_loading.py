"""Loading a Hugging Face directory: sharded safetensors with an index, EOS lists, dtypes, missing weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom import LLM, SamplingParams
from loom.config import ModelConfig
from loom.models.loader import checkpoint_files, load_model


def test_sharded_checkpoint_with_index_loads_identically(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    shutil.copytree(llama_dir, sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(llama_dir)).save_pretrained(str(sharded), max_shard_size="2MB")
    files = checkpoint_files(sharded)
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").is_file()
    prompt = list(range(100, 120))
    a = LLM(llama_dir, dtype="float32", max_batch_total_tokens=256).generate([prompt], SamplingParams(max_new_tokens=8))
    b = LLM(sharded, dtype="float32", max_batch_total_tokens=256).generate([prompt], SamplingParams(max_new_tokens=8))
    assert a[0].token_ids == b[0].token_ids


def test_generation_config_eos_list(llama_dir, tmp_path):
    d = tmp_path / "eos"
    shutil.copytree(llama_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [7, 11]
    (d / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(d, max_batch_total_tokens=256)
    assert llm.engine.eos_token_ids == frozenset({7, 11})


@pytest.mark.parametrize("dtype, expected", [
    ("auto", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32),
])
def test_dtypes(llama_dir, dtype, expected):
    model = load_model(ModelConfig.from_dir(llama_dir, dtype))
    assert {p.dtype for p in model.parameters()} == {expected}


def test_missing_and_unexpected_weights_are_clear_errors(llama_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(llama_dir, d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weights for: model.layers.1.self_attn.qkv_proj.weight"):
        load_model(ModelConfig.from_dir(d))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.extra.weight' has no place"):
        load_model(ModelConfig.from_dir(d))
