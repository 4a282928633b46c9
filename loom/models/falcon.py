"""Falcon: rotary attention with a fused query_key_value in one of three layouts, LayerNorm with bias, and a
parallel (or sequential) attention/MLP block.

The fused rows come in groups, one per key/value head: each group holds that head's queries, then its key, then its
value (`transformers`' `_split_heads`):

    new decoder architecture (40B/180B):   Hkv groups of [q × H/Hkv | k | v]
    multi-query (7B):                      1 group of    [q × H     | k | v]
    multi-head:                            H groups of   [q         | k | v]

so one `FusedPartView` recipe reads all three, and a tensor-parallel rank gets the q, k, v of its own heads.
ALiBi Falcons (e.g. falcon-rw) are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
from loom.models.gpt_neox import FusedPartView


def check_supported(hf: dict[str, Any]) -> None:
    """Refuse Falcon options this implementation (or transformers itself) does not compute."""
    if hf.get("alibi"):
        raise ValueError("Falcon with alibi=True (ALiBi position biases, e.g. falcon-rw) is not supported; "
                         "only rotary Falcon models are")
    num_ln = hf.get("num_ln_in_parallel_attn")
    if num_ln not in (None, 1, 2):
        raise ValueError(f"Falcon with num_ln_in_parallel_attn={num_ln} is not supported (1 or 2)")
    if hf.get("new_decoder_architecture"):
        if not hf.get("parallel_attn", True):
            raise ValueError("Falcon with new_decoder_architecture=True and parallel_attn=False is not supported")
    elif hf.get("parallel_attn", True) and num_ln == 2:
        raise ValueError("Falcon with num_ln_in_parallel_attn=2 needs new_decoder_architecture=True")


def _bias_after(linear: ColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
    # NOTE: FalconLinear adds the bias after the matmul (not fused), which rounds once more in half precision.
    y = linear.matmul(x)
    return y if linear.bias is None else y + linear.bias


class FalconQKV(QKVParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bias_after(self, x)


class FalconColumnLinear(ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bias_after(self, x)


class FalconAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hf, tp = cfg.hf_config, get_tp_group()
        hidden, head_dim, bias = int(hf["hidden_size"]), cfg.head_dim, bool(hf.get("bias", False))
        self.num_heads = cfg.num_attention_heads // tp.size
        self.num_kv_heads = kv_head_range(cfg.num_kv_heads, tp)[1]
        self.head_dim = head_dim
        self.query_key_value = FalconQKV(hidden, head_dim, cfg.num_attention_heads, cfg.num_kv_heads, bias=bias)
        self.dense = RowParallelLinear(hidden, hidden, bias=bias)
        self.rotary = RotaryEmbedding(head_dim, head_dim, cfg.max_model_len, rope_parameters(hf))
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.query_key_value.q_size, self.query_key_value.kv_size
        q, k, v = self.query_key_value(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        o = self.attn(q, k, v)  # (T, Hq, D); query head h reads kv head h // (Hq / Hkv), as transformers
        return self.dense(o.reshape(-1, self.num_heads * self.head_dim))


class FalconMLP(nn.Module):
    def __init__(self, hf: dict[str, Any]):
        super().__init__()
        hidden, bias = int(hf["hidden_size"]), bool(hf.get("bias", False))
        ffn = int(hf.get("ffn_hidden_size") or 4 * hidden)
        self.dense_h_to_4h = FalconColumnLinear(hidden, [ffn], bias=bias)
        self.act = get_activation(hf.get("activation", "gelu"))
        self.dense_4h_to_h = RowParallelLinear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    """Three shapes, as transformers builds them:

    parallel, two norms (new decoder architecture):  x + attn(ln_attn(x)) + mlp(ln_mlp(x))
    parallel, one norm:                              x + attn(ln(x)) + mlp(ln(x))
    sequential (parallel_attn=False):                y = x + attn(ln(x));  y + mlp(ln2(y))
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hf = cfg.hf_config
        hidden, eps = int(hf["hidden_size"]), float(hf.get("layer_norm_epsilon") or 1e-5)
        new_arch = bool(hf.get("new_decoder_architecture", False))
        self.parallel = new_arch or bool(hf.get("parallel_attn", True))
        two_norms = new_arch and (hf.get("num_ln_in_parallel_attn") or 2) == 2
        self.self_attention = FalconAttention(cfg, layer_idx)
        self.mlp = FalconMLP(hf)
        if two_norms:
            self.ln_attn, self.ln_mlp = LayerNorm(hidden, eps), LayerNorm(hidden, eps)
        else:
            self.input_layernorm = LayerNorm(hidden, eps)
        if not self.parallel:
            self.post_attention_layernorm = LayerNorm(hidden, eps)
        self.two_norms = two_norms

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(positions, attn_in)
        if self.parallel:
            return self.mlp(mlp_in) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class FalconModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, hidden)
        self.h = nn.ModuleList(FalconDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = LayerNorm(hidden, float(cfg.get("layer_norm_epsilon") or 1e-5))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        for layer in self.h:
            x = layer(positions, x)
        return self.ln_f(x)


class FalconForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_supported(cfg.hf_config)
        self.config = cfg
        self.transformer = FalconModel(cfg)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.vocab_size, int(cfg.get("hidden_size")))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def _qkv_parts(self, tensor: CheckpointTensor) -> dict[str, FusedPartView]:
        """Views of the fused rows as q, k and v (see the module docstring for the group layout)."""
        d, groups = self.config.head_dim, self.config.num_kv_heads
        q_rows = self.config.num_attention_heads // groups * d  # queries per group
        group = q_rows + 2 * d
        return {"q": FusedPartView(tensor, group, 0, q_rows), "k": FusedPartView(tensor, group, q_rows, d),
                "v": FusedPartView(tensor, group, q_rows + d, d)}

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        """Copy checkpoint tensors into parameters; returns each loaded parameter's shard ids. Unknown names raise."""
        params = dict(self.named_parameters())
        loaded: dict[str, set] = {}
        for name, tensor in weights:
            if name.startswith("lm_head.") and self.tie_word_embeddings:
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"Checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if ".query_key_value." in name:
                for shard, view in self._qkv_parts(tensor).items():
                    param.weight_loader(param, view, shard)
                    loaded.setdefault(name, set()).add(shard)
                continue
            param.weight_loader(param, tensor, None)
            loaded.setdefault(name, set()).add(None)
        return loaded
