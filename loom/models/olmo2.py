"""OLMo 2: a Llama-shaped decoder with the norms moved after the sublayers (post-attention and post-feedforward
RMSNorms on the residual branch, no pre-norms), and RMSNorm over the whole projected q and k before rope."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loom.config import ModelConfig
from loom.distributed.parallel_state import TPGroup, divide, get_tp_group
from loom.layers.attention import Attention
from loom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loom.layers.linear import CheckpointTensor, QKVParallelLinear, RowParallelLinear, copy_checked
from loom.layers.rotary import RotaryEmbedding, rope_parameters
from loom.models.llama import LlamaMLP
from loom.models.weights import llama_style_loader


class Olmo2RMSNorm(nn.Module):
    """OLMo 2's RMSNorm: unlike Llama's, the weight multiplies in float32 before the cast back.

    Given a tensor-parallel `tp`, the normalised features are split across its ranks like the column-parallel
    projection feeding them (q_norm/k_norm span every head, and each rank holds only its own heads): each rank holds
    its slice of `weight`, and the mean of squares is the all-reduced sum of each rank's share.
    """

    def __init__(self, width: int, eps: float, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp or TPGroup()  # default: replicated, the whole vector on every rank
        self.eps = eps
        self.local = divide(width, self.tp.size, "normalised features")
        self.share = self.local / width  # this rank's part of the mean (exactly 1.0 on one rank)
        self.weight = nn.Parameter(torch.empty(self.local), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: object = None) -> None:
        copy_checked(param.data, weight.narrow(0, self.tp.rank * self.local, self.local), "RMSNorm weight shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = self.tp.all_reduce(x32.pow(2).mean(-1, keepdim=True) * self.share)  # (T, 1)
        return (self.weight * (x32 * torch.rsqrt(variance + self.eps))).to(x.dtype)


class Olmo2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hf, tp = cfg.hf_config, get_tp_group()
        hidden, head_dim = int(hf["hidden_size"]), cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp.size
        # NOTE: not replicated across ranks (kv_head_range): k_norm's mean runs over every key head, once each.
        self.num_kv_heads = divide(cfg.num_kv_heads, tp.size, "key/value heads of OLMo 2")
        self.head_dim = head_dim
        bias = bool(hf.get("attention_bias", False))
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, cfg.num_attention_heads, cfg.num_kv_heads, bias=bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, hidden, bias=bias)
        eps = float(hf.get("rms_norm_eps", 1e-5))
        # Over all heads at once, not per head: with several ranks the sum of squares is all-reduced.
        self.q_norm = Olmo2RMSNorm(cfg.num_attention_heads * head_dim, eps, tp)
        self.k_norm = Olmo2RMSNorm(cfg.num_kv_heads * head_dim, eps, tp)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1)
        q = self.q_norm(q).view(-1, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = self.k_norm(k).view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # transformers keeps OLMo 2's cos/sin in float32 and rotates in float32 before casting back
        q32, k32 = rotary(positions, q.float(), k.float())
        o = self.attn(q32.to(q.dtype), k32.to(k.dtype), v)  # (T, Hq, D)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, eps = int(cfg.get("hidden_size")), float(cfg.get("rms_norm_eps", 1e-5))
        self.self_attn = Olmo2Attention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg.hf_config)
        self.post_attention_layernorm = Olmo2RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = Olmo2RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(positions, x, rotary))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, hidden)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.head_dim, cfg.max_model_len, rope_parameters(cfg.hf_config))
        self.layers = nn.ModuleList(Olmo2DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = Olmo2RMSNorm(hidden, float(cfg.get("rms_norm_eps", 1e-5)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, self.rotary)
        return self.norm(x)




class Olmo2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Olmo2Model(cfg)
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
        """Copy checkpoint tensors into parameters; returns each loaded parameter's shard ids. Unknown names raise."""
        return llama_style_loader(self, weights)
