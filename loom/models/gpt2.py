"""GPT-2: learned absolute position embeddings, LayerNorm with bias, fused c_attn, tied LM head.

GPT-2's linear layers are `Conv1D`s whose checkpoint weights are stored transposed, (in, out); the loader reads them
through `TransposedTensor` so every parallel layer sees the usual (out, in) layout and shards it as for any model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.distributed.parallel_state import get_tp_group
from loom.layers.activation import get_activation
from loom.layers.attention import Attention
from loom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loom.layers.linear import (
    CheckpointTensor,
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from loom.layers.norm import LayerNorm
from loom.models.weights import load_checkpoint


@dataclass(frozen=True, slots=True)
class TransposedTensor:
    """A 2-D checkpoint tensor stored (in, out), seen as (out, in); narrowing reads only the requested slice."""

    base: CheckpointTensor

    @property
    def shape(self) -> tuple[int, ...]:
        rows, cols = self.base.shape
        return (cols, rows)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.base.narrow(1 - dim, start, length).t()

    def full(self) -> torch.Tensor:
        return self.base.full().t()


def check_supported(hf: dict[str, Any]) -> None:
    """Refuse GPT-2 options this implementation would otherwise silently compute differently."""
    if hf.get("add_cross_attention"):
        raise ValueError("GPT-2 with add_cross_attention=True (an encoder-decoder setup) is not supported")
    if hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 with reorder_and_upcast_attn=True is not supported (only the default False)")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported (only the default False)")


class PositionEmbedding(nn.Module):
    """Learned absolute positions, replicated on every rank (each rank needs every position)."""

    def __init__(self, max_positions: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, hidden), requires_grad=False)
        self.weight.weight_loader = ReplicatedLinear._load_full

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, head_dim, tp = int(cfg.get("hidden_size")), cfg.head_dim, get_tp_group()
        self.num_heads = cfg.num_attention_heads // tp.size
        self.head_dim = head_dim
        heads = cfg.num_attention_heads
        self.c_attn = QKVParallelLinear(hidden, head_dim, heads, heads, bias=True)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        scale = head_dim**-0.5 if cfg.get("scale_attn_weights", True) else 1.0
        self.attn = Attention(layer_idx, self.num_heads, self.num_heads, head_dim, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.c_attn.q_size
        q, k, v = self.c_attn(x).split([size, size, size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(-1, self.num_heads, self.head_dim)
        v = v.view(-1, self.num_heads, self.head_dim)
        o = self.attn(q, k, v)  # (T, H, D)
        return self.c_proj(o.reshape(-1, self.num_heads * self.head_dim))


class GPT2MLP(nn.Module):
    def __init__(self, hf: dict[str, Any]):
        super().__init__()
        hidden = int(hf["hidden_size"])
        inner = int(hf.get("n_inner") or 4 * hidden)
        self.c_fc = ColumnParallelLinear(hidden, [inner], bias=True)
        self.act = get_activation(hf.get("activation_function", "gelu_new"))
        self.c_proj = RowParallelLinear(inner, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, eps = int(cfg.get("hidden_size")), float(cfg.get("layer_norm_epsilon", 1e-5))
        self.ln_1 = LayerNorm(hidden, eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = LayerNorm(hidden, eps)
        self.mlp = GPT2MLP(cfg.hf_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.wte = VocabParallelEmbedding(cfg.vocab_size, hidden)
        self.wpe = PositionEmbedding(int(cfg.get("max_position_embeddings")), hidden)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = LayerNorm(hidden, float(cfg.get("layer_norm_epsilon", 1e-5)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


# Causal-mask buffers that older checkpoints saved.
_IGNORED = re.compile(r"\.attn\.(bias|masked_bias)$")
# Conv1D weights, stored (in, out).
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_supported(cfg.hf_config)
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.vocab_size, int(cfg.get("hidden_size")))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        """Copy checkpoint tensors into parameters; returns each loaded parameter's shard ids. Unknown names raise."""

        def place(name: str, tensor: CheckpointTensor):
            if _IGNORED.search(name):
                return None
            if name.startswith("lm_head."):
                if self.tie_word_embeddings:
                    return None
            elif not name.startswith("transformer."):  # the original OpenAI checkpoints have no prefix
                name = "transformer." + name
            # c_attn is already fused [q | k | v] (shard None); Conv1D weights are stored (in, out).
            return name, None, TransposedTensor(tensor) if _CONV1D.search(name) else tensor

        return load_checkpoint(self, weights, place)
