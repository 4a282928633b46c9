"""StarCoder2: LayerNorm (with bias) pre-norm decoder, a plain two-layer MLP (c_fc → act → c_proj), optional
biases on every projection (`use_bias`), rope, and an optional sliding window over all layers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loom.config import ModelConfig
from loom.distributed.parallel_state import get_tp_group, kv_head_range
from loom.layers.activation import get_activation
from loom.layers.attention import Attention
from loom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loom.layers.linear import CheckpointTensor, ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from loom.layers.norm import LayerNorm
from loom.layers.rotary import RotaryEmbedding, rope_parameters
from loom.models.weights import llama_style_loader


class Starcoder2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hf, tp = cfg.hf_config, get_tp_group()
        hidden, head_dim, bias = int(hf["hidden_size"]), cfg.head_dim, bool(hf.get("use_bias", True))
        self.num_heads = cfg.num_attention_heads // tp.size
        self.num_kv_heads = kv_head_range(cfg.num_kv_heads, tp)[1]
        self.head_dim = head_dim
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, cfg.num_attention_heads, cfg.num_kv_heads, bias=bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, hidden, bias=bias)
        window = hf.get("sliding_window")
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        o = self.attn(q, k, v)  # (T, Hq, D)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))


class Starcoder2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, inter = int(cfg.get("hidden_size")), int(cfg.get("intermediate_size"))
        bias = bool(cfg.get("use_bias", True))
        self.c_fc = ColumnParallelLinear(hidden, [inter], bias=bias)
        self.c_proj = RowParallelLinear(inter, hidden, bias=bias)
        self.act = get_activation(cfg.get("hidden_act", "gelu_pytorch_tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, eps = int(cfg.get("hidden_size")), float(cfg.get("norm_epsilon", 1e-5))
        self.self_attn = Starcoder2Attention(cfg, layer_idx)
        self.mlp = Starcoder2MLP(cfg)
        # NOTE: the norms always carry a bias; `use_bias` only concerns the linear layers (as in transformers).
        self.input_layernorm = LayerNorm(hidden, eps)
        self.post_attention_layernorm = LayerNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), rotary)
        return x + self.mlp(self.post_attention_layernorm(x))


def _rotary(cfg: ModelConfig) -> RotaryEmbedding:
    params = rope_parameters(cfg.hf_config)
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        # transformers' StarCoder2 rotates whole heads whatever this says (and breaks for scaled rope types)
        raise ValueError(f"StarCoder2 does not support partial_rotary_factor={partial}; only whole-head rope")
    return RotaryEmbedding(cfg.head_dim, cfg.head_dim, cfg.max_model_len, params)


class Starcoder2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, hidden)
        self.rotary = _rotary(cfg)  # one table shared by every layer
        self.layers = nn.ModuleList(Starcoder2DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = LayerNorm(hidden, float(cfg.get("norm_epsilon", 1e-5)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, self.rotary)
        return self.norm(x)


# HF checkpoint names that land in our fused q/k/v parameter: (hf fragment, our fragment, shard id)
_STACKED = ((".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"))


class Starcoder2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Starcoder2Model(cfg)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", True))  # StarCoder2's default: tied
        self.lm_head = ParallelLMHead(cfg.vocab_size, int(cfg.get("hidden_size")))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        """Copy checkpoint tensors into parameters; returns each loaded parameter's shard ids. Unknown names raise."""
        return llama_style_loader(self, weights, _STACKED)
