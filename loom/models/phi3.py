"""Phi-3 / Phi-3.5 / Phi-4-mini: a Llama-shaped decoder whose checkpoints hold q/k/v and gate/up already fused.

Also: partial rotary (Phi-4-mini rotates 3/4 of each head), LongRoPE for the 128k-context variants (see
`loom.layers.rotary._longrope_tables` for how its short/long factors are chosen) and an optional sliding window.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from loom.config import ModelConfig
from loom.distributed.parallel_state import get_tp_group, kv_head_range
from loom.layers.attention import Attention
from loom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loom.layers.linear import CheckpointTensor, QKVParallelLinear, RowParallelLinear
from loom.layers.norm import RMSNorm
from loom.layers.rotary import RotaryEmbedding, rope_parameters
from loom.models.llama import LlamaMLP, layer_windows
from loom.models.weights import llama_style_loader

# Phi3Config's default, which transformers applies (ahead of the rope parameters' own) when config.json omits it.
DEFAULT_ORIGINAL_MAX_POSITIONS = 4096


def phi3_rope(hf: dict[str, Any], head_dim: int) -> tuple[dict[str, Any], int]:
    """Rope parameters and rotary dimension as transformers' Phi3Config resolves them."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    raw = dict(hf.get(key) or {})
    if (raw.get("rope_type") or raw.get("type")) in ("su", "yarn"):
        raw["rope_type"] = "longrope"  # Phi3Config renames the names early checkpoints used
    original = hf.get("original_max_position_embeddings") or DEFAULT_ORIGINAL_MAX_POSITIONS
    params = rope_parameters({**hf, key: raw, "original_max_position_embeddings": original})
    if params["rope_type"] not in ("default", "longrope"):
        raise ValueError(f"Phi-3 supports rope types 'default' and 'longrope', not {params['rope_type']!r}")
    # transformers ≥ 5 keeps the factor inside the rope parameters; older configs have it at the top level
    partial = float(params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)
    return params, int(head_dim * partial)


class Phi3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, window: int | None):
        super().__init__()
        tp = get_tp_group()
        hidden, head_dim = int(cfg.get("hidden_size")), cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp.size
        self.num_kv_heads = kv_head_range(cfg.num_kv_heads, tp)[1]
        self.head_dim = head_dim
        # The checkpoint's qkv_proj is [q; k; v] fused; the loader cuts each rank's heads out of every part.
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, cfg.num_attention_heads, cfg.num_kv_heads)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, hidden)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        o = self.attn(q, k, v)  # (T, Hq, D)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, window: int | None):
        super().__init__()
        hidden, eps = int(cfg.get("hidden_size")), float(cfg.get("rms_norm_eps", 1e-5))
        self.self_attn = Phi3Attention(cfg, layer_idx, window)
        self.mlp = LlamaMLP(cfg.hf_config)  # gate_up_proj fused in the checkpoint: loads with shard id None
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), rotary)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, hidden)
        params, rotary_dim = phi3_rope(cfg.hf_config, cfg.head_dim)
        # One table for all layers: at 128k positions a per-layer copy would cost ~100 MB per layer.
        self.rotary = RotaryEmbedding(cfg.head_dim, rotary_dim, cfg.max_model_len, params)
        windows = layer_windows(cfg.hf_config)
        self.layers = nn.ModuleList(Phi3DecoderLayer(cfg, i, windows[i]) for i in range(cfg.num_layers))
        self.norm = RMSNorm(hidden, float(cfg.get("rms_norm_eps", 1e-5)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, self.rotary)
        return self.norm(x)


class Phi3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Phi3Model(cfg)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, int(cfg.get("hidden_size")))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        """Checkpoint names equal parameter names; fused tensors load with shard id None. Unknown names raise."""
        return llama_style_loader(self, weights, stacked=())
