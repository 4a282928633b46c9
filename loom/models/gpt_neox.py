"""GPT-NeoX / Pythia: LayerNorm with bias, partial rotary (`rotary_pct`), parallel or sequential residual, and a
fused query_key_value projection whose rows are interleaved per head.

The checkpoint's query_key_value rows are laid out [h0: q k v | h1: q k v | ...]; a tensor-parallel rank needs
the q, k and v rows of its own heads, so the loader reads each part through a `FusedPartView` and our
QKVParallelLinear holds them as [q | k | v] of the rank's heads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loom.config import ModelConfig
from loom.distributed.parallel_state import get_tp_group
from loom.layers.activation import get_activation
from loom.layers.attention import Attention
from loom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loom.layers.linear import CheckpointTensor, ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from loom.layers.norm import LayerNorm
from loom.layers.rotary import RotaryEmbedding, rope_parameters


@dataclass(frozen=True, slots=True)
class FusedPartView:
    """One part (e.g. the keys) of a fused checkpoint tensor whose rows repeat in groups, read lazily.

    Rows of `base` come in groups of `group_rows`; in each group, this part is `part_rows` rows starting at
    `offset`. The view's row i is part row i % part_rows of group i // part_rows:

        base rows:  [ group 0: .. offset [part] .. | group 1: .. offset [part] .. | ... ]
        view rows:  [ part of group 0 | part of group 1 | ... ]

    `narrow` on dim 0 must stay inside one group or cover whole groups (a rank's slice always covers whole heads,
    and a group holds whole heads).
    """

    base: CheckpointTensor
    group_rows: int
    offset: int
    part_rows: int

    @property
    def shape(self) -> tuple[int, ...]:
        groups = self.base.shape[0] // self.group_rows
        return (groups * self.part_rows, *self.base.shape[1:])

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim != 0:
            return self.full().narrow(dim, start, length)
        group, within = divmod(start, self.part_rows)
        if within + length <= self.part_rows:  # inside one group: one contiguous read
            return self.base.narrow(0, group * self.group_rows + self.offset + within, length)
        if within or length % self.part_rows:
            raise ValueError(f"Slice [{start}, {start + length}) of a fused tensor does not cover whole heads")
        groups = length // self.part_rows
        rows = self.base.narrow(0, group * self.group_rows, groups * self.group_rows)
        rest = rows.shape[1:]
        part = rows.view(groups, self.group_rows, *rest)[:, self.offset : self.offset + self.part_rows]
        return part.reshape(length, *rest)

    def full(self) -> torch.Tensor:
        return self.narrow(0, 0, self.shape[0])


def neox_rope(hf: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Rope parameters and the rotary fraction, from transformers ≥ 5's `rope_parameters` or the older
    `rotary_emb_base` / `rotary_pct` / `rope_scaling` keys."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        params.setdefault("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    return rope_parameters({**hf, "rope_parameters": params}), float(params.get("partial_rotary_factor", 0.25))


class GPTNeoXAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hf, tp = cfg.hf_config, get_tp_group()
        hidden, head_dim = int(hf["hidden_size"]), cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp.size
        self.head_dim = head_dim
        bias = bool(hf.get("attention_bias", True))
        self.query_key_value = QKVParallelLinear(
            hidden, head_dim, cfg.num_attention_heads, cfg.num_attention_heads, bias=bias
        )
        self.dense = RowParallelLinear(hidden, hidden, bias=bias)
        params, rotary_pct = neox_rope(hf)
        self.rotary = RotaryEmbedding(head_dim, int(head_dim * rotary_pct), cfg.max_model_len, params)
        self.attn = Attention(layer_idx, self.num_heads, self.num_heads, head_dim, head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        size = self.query_key_value.q_size
        q, k, v = self.query_key_value(x).split([size, size, size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(-1, self.num_heads, self.head_dim)
        v = v.view(-1, self.num_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        o = self.attn(q, k, v)  # (T, H, D)
        return self.dense(o.reshape(-1, self.num_heads * self.head_dim))


class GPTNeoXMLP(nn.Module):
    def __init__(self, hf: dict[str, Any]):
        super().__init__()
        hidden, inter = int(hf["hidden_size"]), int(hf["intermediate_size"])
        self.dense_h_to_4h = ColumnParallelLinear(hidden, [inter], bias=True)
        self.act = get_activation(hf.get("hidden_act", "gelu"))
        self.dense_4h_to_h = RowParallelLinear(inter, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hidden, eps = int(cfg.get("hidden_size")), float(cfg.get("layer_norm_eps", 1e-5))
        self.use_parallel_residual = bool(cfg.get("use_parallel_residual", True))
        self.input_layernorm = LayerNorm(hidden, eps)
        self.post_attention_layernorm = LayerNorm(hidden, eps)
        self.attention = GPTNeoXAttention(cfg, layer_idx)
        self.mlp = GPTNeoXMLP(cfg.hf_config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention(positions, self.input_layernorm(x))
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.get("hidden_size"))
        self.embed_in = VocabParallelEmbedding(cfg.vocab_size, hidden)
        self.layers = nn.ModuleList(GPTNeoXLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_layer_norm = LayerNorm(hidden, float(cfg.get("layer_norm_eps", 1e-5)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_in(input_ids)
        for layer in self.layers:
            x = layer(positions, x)
        return self.final_layer_norm(x)


# Buffers some checkpoints saved (causal masks, rotary tables); recomputed here.
_IGNORED = re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.gpt_neox = GPTNeoXModel(cfg)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, int(cfg.get("hidden_size")))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        return self.gpt_neox(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        """Copy checkpoint tensors into parameters; returns each loaded parameter's shard ids. Unknown names raise."""
        params = dict(self.named_parameters())
        loaded: dict[str, set] = {}
        head_dim = self.config.head_dim
        for name, tensor in weights:
            if _IGNORED.search(name):
                continue
            if name.startswith("embed_out."):  # the original name of the (untied) output projection
                name = "lm_head." + name.removeprefix("embed_out.")
            if name.startswith("lm_head.") and self.tie_word_embeddings:
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"Checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if ".query_key_value." in name:
                for i, shard in enumerate(("q", "k", "v")):  # rows per head: [q k v]
                    param.weight_loader(param, FusedPartView(tensor, 3 * head_dim, i * head_dim, head_dim), shard)
                    loaded.setdefault(name, set()).add(shard)
                continue
            param.weight_loader(param, tensor, None)
            loaded.setdefault(name, set()).add(None)
        return loaded
