"""Qwen3-MoE: Qwen3 attention (RMSNorm over each q/k head before rope, bias per `attention_bias`) with routed
experts and no shared expert; dense/sparse layer choice and `norm_topk_prob` as in Qwen2-MoE."""

from __future__ import annotations

from typing import Any

from loom.models.llama import LlamaVariant
from loom.models.qwen2_moe import Qwen2MoeForCausalLM


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    default_num_experts, default_top_k = 128, 8  # transformers' Qwen3MoeConfig defaults
    has_shared_expert = False

    def make_variant(self, hf: dict[str, Any]) -> LlamaVariant:
        return LlamaVariant(qk_norm=True)
