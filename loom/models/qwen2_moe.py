"""Qwen2-MoE: Qwen2 attention (q/k/v bias per `qkv_bias`) with routed experts plus a shared expert.

Which layers are sparse follows transformers: layer i is MoE iff i is not in `mlp_only_layers`, `num_experts` > 0
and (i + 1) is a multiple of `decoder_sparse_step`; the others are dense MLPs of `intermediate_size`. The shared
expert's output is scaled per token by sigmoid(`shared_expert_gate`) and added to the routed experts'. The top-k
routing weights are renormalised only when `norm_topk_prob`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from loom.layers.moe import GatedMLP, SparseMoeBlock
from loom.models.llama import LlamaVariant
from loom.models.mixtral import MoeForCausalLM


def num_experts(hf: dict[str, Any], default: int) -> int:
    """Qwen3-MoE's config.json names it `num_local_experts` (transformers' attribute map), older ones `num_experts`."""
    for key in ("num_experts", "num_local_experts"):
        if hf.get(key) is not None:
            return int(hf[key])
    return default


def is_sparse_layer(hf: dict[str, Any], layer_idx: int, experts: int) -> bool:
    step = int(hf.get("decoder_sparse_step", 1))
    return layer_idx not in (hf.get("mlp_only_layers") or []) and experts > 0 and (layer_idx + 1) % step == 0


class Qwen2MoeForCausalLM(MoeForCausalLM):
    default_num_experts, default_top_k = 60, 4  # transformers' Qwen2MoeConfig defaults
    has_shared_expert = True

    def make_variant(self, hf: dict[str, Any]) -> LlamaVariant:
        return LlamaVariant(qkv_bias=bool(hf.get("qkv_bias", True)))

    def layer_windows(self, hf: dict[str, Any]) -> list[int | None]:
        if hf.get("use_sliding_window") and not hf.get("layer_types"):
            # a config.json from before `layer_types`: transformers derives them the same way
            window, max_layers = hf.get("sliding_window"), int(hf.get("max_window_layers", 28))
            return [window if (i + 1) % 2 and i < max_layers else None for i in range(int(hf["num_hidden_layers"]))]
        return super().layer_windows(hf)

    def make_mlp(self, hf: dict[str, Any], layer_idx: int) -> nn.Module:
        hidden, act = int(hf["hidden_size"]), hf.get("hidden_act", "silu")
        experts = num_experts(hf, self.default_num_experts)
        if not is_sparse_layer(hf, layer_idx, experts):
            return GatedMLP(hidden, int(hf["intermediate_size"]), act)
        shared = int(hf.get("shared_expert_intermediate_size", 5632)) if self.has_shared_expert else 0
        if self.has_shared_expert and shared <= 0:
            raise ValueError(f"{type(self).__name__} needs a positive shared_expert_intermediate_size, got {shared}")
        top_k = int(hf.get("num_experts_per_tok", self.default_top_k))
        return SparseMoeBlock(
            hidden, experts, top_k, int(hf["moe_intermediate_size"]),
            renormalize=bool(hf.get("norm_topk_prob", False)), activation=act, weights_in_dtype=True,
            shared_intermediate=shared,
        )
