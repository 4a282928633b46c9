"""GPT-2, GPT-NeoX (Pythia) and Falcon against transformers on tiny random checkpoints, float32.

Each variant's fused-projection layout is checked three ways: logits at every position (one prefill, chunks over
cached blocks, token-by-token decode), greedy generation through `loom.LLM`, and (for the layouts that interleave
heads) a two-rank tensor-parallel run over gloo, where each rank must pick its own heads out of the fused rows.
None of these families has a sliding window, so the default prompt lengths (up to 100) cover everything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loom.testing.parity import assert_greedy_parity, assert_logits_parity, make_checkpoint
from loom.testing.tiny_models import PADDED_VOCAB

_COMMON = {"vocab_size": PADDED_VOCAB, "initializer_range": 0.1, "bos_token_id": 50256, "eos_token_id": 50256}


def _config(name: str):
    import transformers

    if name == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256, **_COMMON)
    if name == "gpt2-untied-unscaled":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, activation_function="relu",
                                       tie_word_embeddings=False, scale_attn_weights=False, **_COMMON)
    neox = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=256, **_COMMON)
    if name == "pythia":  # parallel residual, rotary over a quarter of each head
        return transformers.GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **neox)
    if name == "neox-sequential":
        return transformers.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=False, attention_bias=False,
                                          tie_word_embeddings=True, **neox)
    falcon = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128, **_COMMON)
    if name == "falcon-7b":  # multi-query, parallel attention, one shared LayerNorm
        return transformers.FalconConfig(multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                         **falcon)
    if name == "falcon-40b":  # grouped KV heads, ln_attn + ln_mlp, with biases
        return transformers.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, bias=True,
                                         tie_word_embeddings=False, **falcon)
    if name == "falcon2-11b":  # new decoder architecture with one shared LayerNorm
        return transformers.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1,
                                         rope_theta=500042.0, **falcon)
    if name == "falcon-mha-sequential":  # per-head [q k v] layout, sequential block
        return transformers.FalconConfig(multi_query=False, parallel_attn=False, new_decoder_architecture=False,
                                         bias=True, **falcon)
    raise KeyError(name)


# The main variant of each layout runs the helper's full prompt set; the option variants a shorter one.
_SHORT = {"lengths": (7, 33)}
VARIANTS = {"gpt2": {}, "pythia": {}, "falcon-40b": {}, "falcon-7b": _SHORT, "gpt2-untied-unscaled": _SHORT,
            "neox-sequential": _SHORT, "falcon2-11b": _SHORT, "falcon-mha-sequential": _SHORT}
GREEDY = ["gpt2", "pythia", "falcon-40b"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            cache[name] = make_checkpoint(tmp_path_factory.mktemp(name), _config(name), tokenizer_dir)
        return cache[name]

    return make


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, checkpoint):
    assert_logits_parity(checkpoint(name), **VARIANTS[name])


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_generation_matches_transformers(name, checkpoint):
    assert_greedy_parity(checkpoint(name))


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(("name", "changes", "message"), [
    ("falcon-7b", {"alibi": True}, "alibi=True"),
    ("falcon-40b", {"parallel_attn": False}, "parallel_attn=False"),
    ("falcon-40b", {"num_ln_in_parallel_attn": 3}, "num_ln_in_parallel_attn=3"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ("pythia", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.25}}, "rope scaling type 'yarn'"),
])
def test_unsupported_options_are_clear_errors(name, changes, message, checkpoint, tmp_path):
    from loom.config import ModelConfig
    from loom.models.loader import load_model

    bad = _edit_config(checkpoint(name), tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=message):
        load_model(ModelConfig.from_dir(bad, "float32"))


def test_unknown_checkpoint_tensor_is_an_error(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from loom.config import ModelConfig
    from loom.models.loader import load_model

    bad = _edit_config(checkpoint("pythia"), tmp_path / "extra")
    tensors = load_file(bad / "model.safetensors")
    tensors["gpt_neox.layers.0.attention.surprise.weight"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="surprise"):
        load_model(ModelConfig.from_dir(bad, "float32"))


def test_old_style_neox_config_and_names(checkpoint, tmp_path):
    """Pythia checkpoints on the Hub predate `rope_parameters` (rotary_pct, rotary_emb_base) and call the output
    projection `embed_out`."""
    from safetensors.torch import load_file, save_file

    src = checkpoint("pythia")
    old = _edit_config(src, tmp_path / "old", rotary_pct=0.25, rotary_emb_base=10000)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["rope_parameters"]
    (old / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(old / "model.safetensors")
    tensors = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in tensors.items()}
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.zeros(2)
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    assert "embed_out.weight" in tensors
    assert_logits_parity(old, lengths=(20,), chunks=(None,))


def test_original_gpt2_checkpoint_names(checkpoint, tmp_path):
    """openai-community/gpt2 has no `transformer.` prefix and saved its causal-mask buffers (`attn.bias`)."""
    from safetensors.torch import load_file, save_file

    old = _edit_config(checkpoint("gpt2"), tmp_path / "old")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(old / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    assert "h.0.attn.c_attn.bias" in tensors and "wpe.weight" in tensors
    assert_logits_parity(old, lengths=(20,), chunks=(None,))


# --- tensor parallelism: two gloo ranks, each holding half of the heads ---------------------------------------

TP_VARIANTS = ["gpt2", "pythia", "falcon-40b", "falcon-7b"]  # falcon-7b: one KV head, replicated on both ranks


@pytest.mark.slow  # a spawned second rank: a few seconds of start-up
def test_tensor_parallel_splits_fused_heads(checkpoint):
    """This process is rank 0 of a two-rank group: its runner sends each model load and plan to the spawned rank,
    and gets the logits gathered from both vocabulary halves."""
    from loom.config import ModelConfig
    from loom.engine.kv.kv_manager import KVCacheManager
    from loom.testing.parity import hf_model, paged_logits
    from loom.worker.runner import ModelRunner
    from loom.worker.tp_worker import LocalRanks

    paths = [str(checkpoint(name)) for name in TP_VARIANTS]
    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        expected = [hf_model(p)(torch.tensor([ids])).logits[0].float() for p in paths]
    ranks = LocalRanks(2)
    try:
        for path, want in zip(paths, expected):
            runner = ModelRunner(ModelConfig.from_dir(path, "float32"), num_blocks=4, block_size=16)
            for chunk in (len(ids), 1):
                got = paged_logits(runner, KVCacheManager(4, 16, False), ids, chunk)
                diff = (got - want).abs().max().item()
                assert diff <= 1e-4, f"{path}, chunk {chunk}: max abs diff {diff}"
    finally:
        ranks.close()
