"""Llama-family decoders: Llama (incl. Llama-3 rope scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Written for the flattened token batch of continuous batching: inputs are (T,) ids and positions of every token
computed this step, across all sequences; attention finds each sequence's context in the paged KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.distributed.parallel_state import get_tp_group, kv_head_range
from loom.layers.attention import Attention
from loom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loom.layers.kernels import fused_cpu
from loom.layers.linear import CheckpointTensor, ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from loom.layers.norm import RMSNorm
from loom.layers.rotary import MRotaryEmbedding, RotaryEmbedding, rope_parameters
from loom.models.weights import llama_style_loader


@dataclass(frozen=True)
class LlamaVariant:
    """What distinguishes the members of the family."""

    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rope


def layer_windows(hf: dict[str, Any]) -> list[int | None]:
    """Sliding-window size per layer (None = full attention), from `layer_types` or Mistral's `sliding_window`."""
    n = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if hf.get("use_sliding_window") is False:
        return [None] * n
    return [window] * n


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, variant: LlamaVariant, window: int | None):
        super().__init__()
        hf, tp = cfg.hf_config, get_tp_group()
        hidden, head_dim = int(hf["hidden_size"]), cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp.size
        self.num_kv_heads = kv_head_range(cfg.num_kv_heads, tp)[1]
        self.head_dim = head_dim
        bias = bool(hf.get("attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            hidden, head_dim, cfg.num_attention_heads, cfg.num_kv_heads, bias=bias or variant.qkv_bias
        )
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, hidden, bias=bias)
        eps = float(hf.get("rms_norm_eps", 1e-6))
        self.q_norm = RMSNorm(head_dim, eps) if variant.qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if variant.qk_norm else None
        rotary_dim = int(head_dim * float(hf.get("partial_rotary_factor", 1.0)))
        rope = rope_parameters(hf)
        rotary_cls = MRotaryEmbedding if rope.get("mrope_section") else RotaryEmbedding  # Qwen2-VL's language model
        self.rotary = rotary_cls.shared(head_dim, rotary_dim, cfg.max_model_len, rope)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.q_norm is None and positions.dim() == 1:  # (3, T): M-RoPE positions, the unfused path
            rope = self.rotary
            o = self.attn.decode_fused_qkv(qkv, positions, rope.cos, rope.sin, rope.rotary_dim)
            if o is not None:
                return self.o_proj(o.view(-1, self.num_heads * self.head_dim))
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = self.attn(q, k, v)  # (T, Hq, D)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, hf: dict[str, Any]):
        super().__init__()
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Unsupported hidden_act {act!r} for this architecture (only 'silu')")
        hidden, inter = int(hf["hidden_size"]), int(hf["intermediate_size"])
        bias = bool(hf.get("mlp_bias", False))
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fused = fused_cpu.silu_mul(gate_up)
        if fused is not None:
            return self.down_proj(fused)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, variant: LlamaVariant, window: int | None):
        super().__init__()
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        hidden = int(cfg.get("hidden_size"))
        self.self_attn = LlamaAttention(cfg, layer_idx, variant, window)
        self.mlp = LlamaMLP(cfg.hf_config)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added): transformers' `x + attn(norm(x))`,
        `x + mlp(norm(x))`, with each residual add done together with the norm that follows it (the next layer's
        input norm, or the final norm) so a layer costs two fewer calls."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h, residual = self.post_attention_layernorm.add_forward(self.self_attn(positions, h), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, variant: LlamaVariant):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, hidden)
        windows = layer_windows(cfg.hf_config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, variant, windows[i]) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(hidden, float(cfg.get("rms_norm_eps", 1e-6)))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' input embeddings."""
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`embeds`: the input embeddings when not the tokens' own (a vision-language model's merged images)."""
        x = self.embed(input_ids) if embeds is None else embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm.add_forward(x, residual)[0]




class LlamaForCausalLM(nn.Module):
    variant = LlamaVariant()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.variant)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, int(cfg.get("hidden_size")))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        return self.model(input_ids, positions, embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        """Copy checkpoint tensors into parameters; returns each loaded parameter's shard ids. Unknown names raise."""
        return llama_style_loader(self, weights)

class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    variant = LlamaVariant(qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    variant = LlamaVariant(qk_norm=True)
