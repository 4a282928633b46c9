"""Gemma 2 decoder, and the Gemma skeleton that Gemma (loom/models/gemma.py) and Gemma 3 (loom/models/gemma3.py)
reuse.

What sets Gemma apart from Llama: embeddings scaled by sqrt(hidden) in the activation dtype; GemmaRMSNorm
(scale 1 + weight) before *and after* both attention and the MLP; a gated GELU-tanh MLP; attention scaled by
`query_pre_attn_scalar ** -0.5` with tanh soft-capping of the scores; sliding-window and global layers alternating;
tanh soft-capping of the final logits; tied embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loom.config import ModelConfig
from loom.distributed.parallel_state import get_tp_group, kv_head_range
from loom.layers.activation import get_activation
from loom.layers.attention import Attention
from loom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loom.layers.linear import CheckpointTensor, ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from loom.layers.norm import GemmaRMSNorm
from loom.layers.rotary import RotaryEmbedding, rope_parameters
from loom.models.weights import llama_style_loader

LAYER_TYPES = ("sliding_attention", "full_attention")


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


@dataclass(frozen=True)
class GemmaVariant:
    """What a Gemma generation sets in every layer (the model class's hooks decide it)."""

    attn_softcap: float | None  # tanh cap of the attention scores
    qk_norm: bool  # GemmaRMSNorm over each head of q and k
    attn_scale: float  # the attention scores' scale
    activation: str  # the gated MLP's activation
    sandwich_norms: bool  # norms before and after attention and the MLP (Gemma 2/3); Gemma: before each only


class GemmaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, window: int | None, variant: GemmaVariant):
        super().__init__()
        hf, tp = cfg.hf_config, get_tp_group()
        hidden, head_dim = int(hf["hidden_size"]), cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp.size
        self.num_kv_heads = kv_head_range(cfg.num_kv_heads, tp)[1]
        self.head_dim = head_dim
        bias = bool(hf.get("attention_bias", False))
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, cfg.num_attention_heads, cfg.num_kv_heads, bias=bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, hidden, bias=bias)
        eps = float(hf.get("rms_norm_eps", 1e-6))
        self.q_norm = GemmaRMSNorm(head_dim, eps) if variant.qk_norm else None
        self.k_norm = GemmaRMSNorm(head_dim, eps) if variant.qk_norm else None
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, head_dim, variant.attn_scale, window,
                              variant.attn_softcap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        o = self.attn(q, k, v)  # (T, Hq, D)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))


class GemmaMLP(nn.Module):
    def __init__(self, hf: dict[str, Any], activation: str):
        super().__init__()
        self.act = get_activation(activation)
        hidden, inter = int(hf["hidden_size"]), int(hf["intermediate_size"])
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter])
        self.down_proj = RowParallelLinear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class GemmaDecoderLayer(nn.Module):
    """Gemma 2/3: x + post_attn(attn(input(x))), then x + post_ff(mlp(pre_ff(x))). Gemma (no sandwich norms):
    x + attn(input(x)), then x + mlp(post_attention_layernorm(x)) -- its checkpoints' name for the norm before
    the MLP."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, window: int | None, variant: GemmaVariant):
        super().__init__()
        hidden, eps = int(cfg.get("hidden_size")), float(cfg.get("rms_norm_eps", 1e-6))
        self.self_attn = GemmaAttention(cfg, layer_idx, window, variant)
        self.mlp = GemmaMLP(cfg.hf_config, variant.activation)
        self.sandwich_norms = variant.sandwich_norms
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        if self.sandwich_norms:
            self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        if not self.sandwich_norms:
            x = x + self.self_attn(positions, self.input_layernorm(x), rotary)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), rotary))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    """`layer_types[i]` picks layer i's window and its rotary table from `ropes` (one table per distinct rope)."""

    def __init__(self, cfg: ModelConfig, layer_types: list[str], ropes: dict[str, dict[str, Any]],
                 variant: GemmaVariant):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, hidden)
        # transformers keeps sqrt(hidden) as a float32 buffer and casts it to the weight dtype before multiplying
        self.register_buffer("normalizer", torch.tensor(hidden**0.5, dtype=torch.float32), persistent=False)
        window = cfg.get("sliding_window")
        self.layer_types = layer_types
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, i, window if kind == "sliding_attention" else None, variant)
            for i, kind in enumerate(layer_types)
        )
        # NOTE: one cos/sin table per distinct rope, shared by its layers (a table per layer would cost
        # layers × max_positions × head_dim × 8 bytes); layer types with equal ropes share one too.
        self.rotary = nn.ModuleDict()
        for kind in dict.fromkeys(layer_types):
            twin = next((seen for seen in self.rotary if ropes[seen] == ropes[kind]), None)
            self.rotary[kind] = self.rotary[twin] if twin is not None else RotaryEmbedding(
                cfg.head_dim, cfg.head_dim, cfg.max_model_len, ropes[kind]
            )
        self.norm = GemmaRMSNorm(hidden, float(cfg.get("rms_norm_eps", 1e-6)))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' input embeddings (scaled by sqrt(hidden), Gemma's rule)."""
        x = self.embed_tokens(input_ids)
        return x * self.normalizer.to(x.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`embeds`: the input embeddings when not the tokens' own (a vision-language model's merged images)."""
        x = self.embed(input_ids) if embeds is None else embeds
        for layer, kind in zip(self.layers, self.layer_types):
            x = layer(positions, x, self.rotary[kind])
        return self.norm(x)




class Gemma2ForCausalLM(nn.Module):
    """Gemma 2. Subclasses override the hooks below (defaults are transformers' config defaults)."""

    qk_norm = False
    sandwich_norms = True
    default_final_softcap: float | None = 30.0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        hf = cfg.hf_config
        self.check_supported(hf)
        layer_types = self.layer_types(hf)
        variant = GemmaVariant(self.attn_softcap(hf), self.qk_norm, self.attn_scale(hf, cfg.head_dim),
                               self.activation(hf), self.sandwich_norms)
        self.model = GemmaModel(cfg, layer_types, self.ropes(hf), variant)
        self.final_softcap = hf.get("final_logit_softcapping", self.default_final_softcap)
        self.tie_word_embeddings = bool(hf.get("tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.vocab_size, int(hf["hidden_size"]))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- hooks: what differs between Gemma 2 and Gemma 3 ---
    def check_supported(self, hf: dict[str, Any]) -> None:
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{type(self).__name__}: use_bidirectional_attention=True (non-causal attention) "
                             "is not supported; Loom serves causal generation only")

    def layer_types(self, hf: dict[str, Any]) -> list[str]:
        n = int(hf["num_hidden_layers"])
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        return checked_layer_types(types, n)

    def ropes(self, hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
        params = rope_parameters(hf)
        return dict.fromkeys(LAYER_TYPES, params)

    def attn_softcap(self, hf: dict[str, Any]) -> float | None:
        return hf.get("attn_logit_softcapping", 50.0)

    def attn_scale(self, hf: dict[str, Any], head_dim: int) -> float:
        return float(hf.get("query_pre_attn_scalar", 256)) ** -0.5

    def activation(self, hf: dict[str, Any]) -> str:
        # NOTE: transformers reads only `hidden_activation` (old configs' `hidden_act` is ignored), default gelu-tanh
        return hf.get("hidden_activation") or "gelu_pytorch_tanh"

    # --- the model interface ---
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        return self.model(input_ids, positions, embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head.compute_logits(hidden)  # None on tensor-parallel ranks other than 0
        return None if logits is None else softcap(logits, self.final_softcap)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        """Copy checkpoint tensors into parameters; returns each loaded parameter's shard ids. Unknown names raise."""
        return llama_style_loader(self, weights)

def checked_layer_types(types: list[str], num_layers: int) -> list[str]:
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"Unsupported layer types {unknown}; supported: {', '.join(LAYER_TYPES)}")
    return list(types)
