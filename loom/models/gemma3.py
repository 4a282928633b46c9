"""Gemma 3 text decoder (`Gemma3ForCausalLM`): Gemma 2 plus GemmaRMSNorm over each head of q and k, a separate
rope for the local (sliding-window) layers, and five local layers per global one by default.

Attention scores are not soft-capped: transformers' Gemma 3 never applies `attn_logit_softcapping`, so a config
that sets it is refused rather than followed one way or the other.
"""

from __future__ import annotations

from typing import Any

from loom.models.gemma2 import LAYER_TYPES, Gemma2ForCausalLM, checked_layer_types

# transformers' Gemma3TextConfig.default_theta
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def gemma3_ropes(hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rope parameters per layer type.

    transformers ≥ 5 writes `rope_parameters` keyed by layer type; older configs have `rope_theta` and
    `rope_scaling` for the global layers and `rope_local_base_freq` for the local ones (always unscaled).
    """
    nested = hf.get("rope_parameters")
    if nested:
        if not set(nested) <= set(LAYER_TYPES):
            raise ValueError(f"Gemma 3 rope_parameters must be keyed by layer type ({', '.join(LAYER_TYPES)}); "
                             f"got keys {sorted(nested)}")
        ropes = {kind: dict(nested.get(kind) or {}) for kind in LAYER_TYPES}
    else:
        ropes = {
            "full_attention": {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")},
            "sliding_attention": {"rope_theta": hf.get("rope_local_base_freq")},
        }
    for kind, params in ropes.items():
        params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
        if params.get("rope_theta") is None:
            params["rope_theta"] = _DEFAULT_THETA[kind]
    return ropes


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
    default_final_softcap = None

    def check_supported(self, hf: dict[str, Any]) -> None:
        super().check_supported(hf)
        if hf.get("attn_logit_softcapping") is not None:
            raise ValueError("Gemma3ForCausalLM: attn_logit_softcapping is set, but Gemma 3 does not soft-cap "
                             "attention scores (transformers ignores the option); remove it from config.json")

    def layer_types(self, hf: dict[str, Any]) -> list[str]:
        n = int(hf["num_hidden_layers"])
        types = hf.get("layer_types")
        if not types:
            pattern = int(hf.get("sliding_window_pattern") or 6)  # every `pattern`-th layer is global
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        return checked_layer_types(types, n)

    def ropes(self, hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return gemma3_ropes(hf)

    def attn_softcap(self, hf: dict[str, Any]) -> float | None:
        return None
