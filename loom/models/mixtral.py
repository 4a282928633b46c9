"""Mixtral, and the decoder scaffolding the Qwen MoE families share with it.

A Mixtral layer is a Mistral attention block (sliding window on every layer when `sliding_window` is set) followed by
a sparse MoE block: softmax router, top-k experts, the selected weights always renormalised. Experts are loaded from
transformers' per-expert names (`block_sparse_moe.experts.{e}.w1/w2/w3`) or the fused 3-D ones
(`mlp.experts.gate_up_proj` / `down_proj`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from loom.config import ModelConfig
from loom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loom.layers.linear import CheckpointTensor
from loom.layers.moe import SparseMoeBlock, expert_param_target
from loom.layers.norm import RMSNorm
from loom.models.llama import LlamaAttention, LlamaVariant, layer_windows
from loom.models.weights import is_skipped_buffer, load_checkpoint, stacked_name

class MoeDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, variant: LlamaVariant, window: int | None, mlp: nn.Module):
        super().__init__()
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        hidden = int(cfg.get("hidden_size"))
        self.self_attn = LlamaAttention(cfg, layer_idx, variant, window)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class MoeModel(nn.Module):
    def __init__(self, cfg: ModelConfig, variant: LlamaVariant, mlps: list[nn.Module], windows: list[int | None]):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, hidden)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(cfg, i, variant, windows[i], mlps[i]) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(hidden, float(cfg.get("rms_norm_eps", 1e-6)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, H)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class MoeForCausalLM(nn.Module):
    """A Llama-style decoder whose feed-forward is chosen per layer by `make_mlp` (sparse MoE or dense)."""

    # checkpoint fragments renamed before mapping (older module names → ours)
    renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        mlps = [self.make_mlp(cfg.hf_config, i) for i in range(cfg.num_layers)]
        self.model = MoeModel(cfg, self.make_variant(cfg.hf_config), mlps, self.layer_windows(cfg.hf_config))
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, int(cfg.get("hidden_size")))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_variant(self, hf: dict[str, Any]) -> LlamaVariant:
        return LlamaVariant()

    def make_mlp(self, hf: dict[str, Any], layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def layer_windows(self, hf: dict[str, Any]) -> list[int | None]:
        """Sliding window per layer (None = full attention)."""
        return layer_windows(hf)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def _target(self, name: str) -> tuple[str, object]:
        for old, new in self.renames:
            name = name.replace(old, new)
        expert = expert_param_target(name)
        if expert is not None:
            return expert
        return stacked_name(name)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        """Copy checkpoint tensors into parameters; returns each loaded parameter's shard ids. Unknown names raise."""

        def place(name: str, tensor: CheckpointTensor):
            if is_skipped_buffer(name, self.tie_word_embeddings):
                return None
            return (*self._target(name), tensor)

        return load_checkpoint(self, weights, place)


class MixtralForCausalLM(MoeForCausalLM):
    renames = ((".block_sparse_moe.", ".mlp."),)

    def make_mlp(self, hf: dict[str, Any], layer_idx: int) -> nn.Module:
        # NOTE: Mixtral keeps the routing weights in float32 when scaling expert outputs (Qwen casts them down).
        return SparseMoeBlock(
            int(hf["hidden_size"]), int(hf.get("num_local_experts", 8)), int(hf.get("num_experts_per_tok", 2)),
            int(hf["intermediate_size"]), renormalize=True, activation=hf.get("hidden_act", "silu"),
            weights_in_dtype=False,
        )
