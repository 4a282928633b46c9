"""config.json read as transformers reads it: each family's key/value head count from the keys its transformers
class uses (a stray `num_key_value_heads` in a GPT-2 or GPT-NeoX config is ignored, as transformers ignores it), and
a config without `architectures` resolved from `model_type` as AutoModelForCausalLM does. The oracle is the KV cache
transformers itself builds for the same config.json."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from loom.config import ModelConfig
from loom.models.registry import supported_architectures

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
             bos_token_id=0, eos_token_id=1)
CASES = {
    "gpt2 with a stray num_key_value_heads": ("gpt2", dict(n_embd=64, n_layer=1, n_head=4, vocab_size=128,
                                                           bos_token_id=0, eos_token_id=1, num_key_value_heads=1)),
    "gpt_neox with a stray num_key_value_heads": ("gpt_neox", dict(SMALL, num_key_value_heads=1)),
    "falcon multi-query, stray count": ("falcon", dict(SMALL, new_decoder_architecture=False, multi_query=True,
                                                       num_key_value_heads=4)),
    "falcon multi-head, stray count": ("falcon", dict(SMALL, new_decoder_architecture=False, multi_query=False,
                                                      num_key_value_heads=1)),
    "falcon new decoder": ("falcon", dict(SMALL, new_decoder_architecture=True, num_kv_heads=2,
                                          num_key_value_heads=4)),
    "llama grouped": ("llama", dict(SMALL, num_key_value_heads=2)),
    "qwen2 grouped": ("qwen2", dict(SMALL, num_key_value_heads=2)),
    "mistral": ("mistral", dict(SMALL, num_key_value_heads=1, sliding_window=None)),
}


def transformers_kv_geometry(config) -> tuple[int, int]:
    """(key/value heads, head size) of the cache transformers builds for this config."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        cache = model(torch.tensor([[2, 3]]), use_cache=True).past_key_values
    shape = cache.layers[0].keys.shape  # (batch, kv heads, positions, head size)
    return int(shape[1]), int(shape[3])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kv_heads_and_architecture_as_transformers_reads_them(case, tmp_path):
    model_type, fields = CASES[case]
    config = AutoConfig.for_model(model_type, **fields)
    raw = json.loads(config.to_json_string())
    raw.pop("architectures", None)  # as transformers writes a config of a model loaded from GGUF
    raw.update({k: v for k, v in fields.items() if k == "num_key_value_heads"})  # the stray key stays in the file
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loom = ModelConfig.from_dir(tmp_path, "float32")
    assert loom.architecture == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    assert (loom.num_kv_heads, loom.head_dim) == transformers_kv_geometry(config)


def test_every_supported_family_is_found_from_its_model_type(tmp_path):
    by_class = {name: model_type for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
                if isinstance(name, str)}
    families = [a for a in supported_architectures() if a in by_class]
    assert len(families) >= 10
    for architecture in families:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": by_class[architecture], **SMALL}))
        assert ModelConfig.from_dir(tmp_path, "float32").architecture == architecture


def test_a_config_naming_no_causal_lm_is_refused_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", **SMALL}))
    with pytest.raises(ValueError, match="no `architectures` entry and its model_type .vit."):
        ModelConfig.from_dir(tmp_path, "float32")


def test_a_gpt2_checkpoint_with_a_stray_key_serves_greedy_as_transformers(tmp_path, tokenizer_dir):
    """The reported failure: the stray count once sized the KV cache wrong and the first request crashed."""
    import transformers

    from loom.testing.parity import assert_greedy_parity, make_checkpoint
    from loom.testing.tiny_models import PADDED_VOCAB

    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=PADDED_VOCAB,
                                     bos_token_id=50256, eos_token_id=50256, initializer_range=0.1)
    path = make_checkpoint(tmp_path / "gpt2", config, tokenizer_dir)
    raw = json.loads((path / "config.json").read_text())
    raw["num_key_value_heads"] = 1
    raw.pop("architectures")
    (path / "config.json").write_text(json.dumps(raw))
    assert_greedy_parity(path)
