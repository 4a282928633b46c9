"""Gemma (v1) decoder (`GemmaForCausalLM`, and PaliGemma 1's language model): Gemma 2 without its extra norms,
soft-capping and sliding window.

Per layer: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)) (the norm before the MLP, Llama's
layout under Gemma's names); attention scaled by head_dim ** -0.5; every layer global; no soft-capping. What it
keeps from Gemma 2: embeddings scaled by sqrt(hidden), GemmaRMSNorm (scale 1 + weight), the gated GELU-tanh MLP.
"""

from __future__ import annotations

from typing import Any

from loom.models.gemma2 import Gemma2ForCausalLM


class GemmaForCausalLM(Gemma2ForCausalLM):
    sandwich_norms = False
    default_final_softcap = None

    def check_supported(self, hf: dict[str, Any]) -> None:
        super().check_supported(hf)
        capped = [k for k in ("attn_logit_softcapping", "final_logit_softcapping") if hf.get(k) is not None]
        if capped:
            raise ValueError(f"GemmaForCausalLM: {', '.join(capped)} is set, but Gemma does not soft-cap (transformers "
                             "ignores the option); remove it from config.json")

    def layer_types(self, hf: dict[str, Any]) -> list[str]:
        return ["full_attention"] * int(hf["num_hidden_layers"])

    def attn_softcap(self, hf: dict[str, Any]) -> float | None:
        return None

    def attn_scale(self, hf: dict[str, Any], head_dim: int) -> float:
        return head_dim**-0.5

    def activation(self, hf: dict[str, Any]) -> str:
        # transformers' GemmaConfig reads `hidden_act` (its "gelu" meaning the tanh approximation); a
        # `hidden_activation` (Gemma 2's key, in some Gemma configs) is ignored
        act = hf.get("hidden_act") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if act == "gelu" else act
