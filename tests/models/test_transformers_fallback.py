"""The generic transformers fallback: architectures Loom has no own implementation for run through transformers'
modeling code with Loom's paged attention, and match transformers itself (the oracle)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers

from loom.config import ModelConfig
from loom.distributed.parallel_state import TPGroup
from loom.models.loader import load_model
from loom.models.registry import resolve_model_class
from loom.models.transformers_fallback import TransformersForCausalLM
from loom.testing.parity import assert_greedy_parity, assert_logits_parity, make_checkpoint
from loom.testing.tiny_models import PADDED_VOCAB

COMMON = {
    "vocab_size": PADDED_VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "initializer_range": 0.1, "max_position_embeddings": 2048, "bos_token_id": 50256, "eos_token_id": 50258,
    "tie_word_embeddings": False,
}


def _configs() -> dict[str, transformers.PreTrainedConfig]:
    return {
        # rotary + GQA, with Granite's embedding/residual/attention multipliers and logits_scaling after the head
        "granite": transformers.GraniteConfig(
            **COMMON, intermediate_size=128, num_key_value_heads=2, embedding_multiplier=3.0,
            residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0,
        ),
        # learned absolute positions (offset by 2), biases, LayerNorm, ReLU; no rotary
        "opt": transformers.OPTConfig(
            vocab_size=PADDED_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
            word_embed_proj_dim=64, max_position_embeddings=2048, init_std=0.1, bos_token_id=50256,
            eos_token_id=50258, pad_token_id=1,
        ),
        # a sliding-window layer (passed to the attention function as `sliding_window`) next to a full one
        "cohere2": transformers.Cohere2Config(
            **COMMON, intermediate_size=128, num_key_value_heads=2, sliding_window=24,
            layer_types=["sliding_attention", "full_attention"], logit_scale=0.5,
        ),
    }


@pytest.fixture(scope="module")
def fallback_model(tmp_path_factory, tokenizer_dir):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"fallback-{name}")
            cache[name] = make_checkpoint(out, _configs()[name], tokenizer_dir)
        return cache[name]

    return make


@pytest.mark.parametrize("name", ["granite", "opt", "cohere2"])
def test_logits_match_transformers(name, fallback_model):
    # 40 tokens cross cohere2's 24-token window and three KV blocks: in one prefill, in chunks, in decode
    assert_logits_parity(fallback_model(name), lengths=(1, 7, 40))


@pytest.mark.parametrize("name", ["granite", "opt"])
def test_greedy_generation_matches_transformers(name, fallback_model):
    assert_greedy_parity(fallback_model(name))


def test_fallback_is_picked_with_a_warning(fallback_model, caplog):
    path = fallback_model("granite")
    cfg = ModelConfig.from_dir(path, "float32")
    with caplog.at_level(logging.WARNING, logger="loom.models.registry"):
        assert resolve_model_class(cfg.architecture, cfg.hf_config) is TransformersForCausalLM
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "GraniteForCausalLM" in warnings[0].getMessage()
    assert "slower generic transformers path" in warnings[0].getMessage()
    model = load_model(cfg)
    assert isinstance(model, TransformersForCausalLM)
    assert model.hf.config._attn_implementation == "loom_paged"


def _config_dir(tmp_path: Path, config: transformers.PreTrainedConfig, architecture: str) -> Path:
    """A model directory with only a config.json: everything below fails before any weight is read."""
    out = tmp_path / architecture
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": [architecture]}))
    return out


def _load(path: Path) -> None:
    load_model(ModelConfig.from_dir(path, "float32"))


def test_encoder_decoder_is_refused(tmp_path):
    bart = transformers.BartConfig(d_model=64, encoder_layers=1, decoder_layers=1)
    with pytest.raises(ValueError, match="BartForConditionalGeneration is an encoder-decoder model"):
        _load(_config_dir(tmp_path, bart, "BartForConditionalGeneration"))


def test_unsupported_multimodal_is_refused_naming_the_supported_ones(tmp_path):
    mllama = transformers.MllamaConfig()
    with pytest.raises(ValueError, match=r"MllamaForConditionalGeneration is a multimodal model .*vision_config.*"
                                         r"LlavaForConditionalGeneration"):
        _load(_config_dir(tmp_path, mllama, "MllamaForConditionalGeneration"))


def test_architecture_transformers_cannot_load_either_is_refused(tmp_path):
    cfg = transformers.LlamaConfig(**COMMON).to_dict()
    cfg.update(model_type="fancy_new", architectures=["FancyNewForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"Unsupported model architecture 'FancyNewForCausalLM'.*LlamaForCausalLM"):
        _load(tmp_path)


# Decoder-only models whose attention transformers has not moved onto its AttentionInterface (the list shrinks
# release by release: GPT-J moved in 5.24), with a tiny config each.
_OUTSIDE_THE_INTERFACE = {
    "BloomForCausalLM": lambda: transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4),
    "MptForCausalLM": lambda: transformers.MptConfig(d_model=64, n_layers=2, n_heads=4),
    "XGLMForCausalLM": lambda: transformers.XGLMConfig(d_model=64, num_layers=2, attention_heads=4),
}


def test_model_outside_the_attention_interface_is_refused(tmp_path):
    outside = [a for a in _OUTSIDE_THE_INTERFACE if not getattr(transformers, a)._can_set_attn_implementation()]
    if not outside:
        pytest.skip("every candidate architecture uses the AttentionInterface in this transformers release")
    arch = outside[0]
    with pytest.raises(ValueError, match=f"{arch}'s attention does not go through transformers' AttentionInterface"):
        _load(_config_dir(tmp_path, _OUTSIDE_THE_INTERFACE[arch](), arch))


def test_recurrent_layers_are_refused(tmp_path):
    qwen3_next = transformers.Qwen3NextConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"Qwen3NextForCausalLM has \['linear_attention'\] layers"):
        _load(_config_dir(tmp_path, qwen3_next, "Qwen3NextForCausalLM"))


def test_tensor_parallelism_is_refused(fallback_model, monkeypatch):
    import loom.models.transformers_fallback as fallback

    monkeypatch.setattr(fallback, "get_tp_group", lambda: TPGroup(rank=0, size=2))
    with pytest.raises(ValueError, match="no tensor parallelism"):
        _load(fallback_model("opt"))


def test_attention_options_it_cannot_honour_are_refused():
    from loom.models.transformers_fallback import paged_attention_forward

    q = torch.zeros(1, 4, 3, 16)
    sinks = torch.zeros(4)  # gpt-oss style attention sinks: extra softmax mass Loom's attention has no term for
    with pytest.raises(ValueError, match=r"does not implement: \['s_aux'\]"):
        paged_attention_forward(torch.nn.Module(), q, q, q, None, scaling=0.25, s_aux=sinks)
