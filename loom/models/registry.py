"""Maps the HF `architectures` string of a checkpoint to the class that implements it.

Entries name a module and a class and are imported on first use, so one family's import cost or optional
dependency never affects another. An unregistered decoder that `transformers` itself can run falls back to the
generic (slower) path in `transformers_fallback.py`, with a warning.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from torch import nn

from loom.distributed.parallel_state import TPGroup, kv_head_range

if TYPE_CHECKING:
    from loom.config import ModelConfig

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("loom.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("loom.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("loom.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("loom.models.llama", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("loom.models.phi3", "Phi3ForCausalLM"),
    "Starcoder2ForCausalLM": ("loom.models.starcoder2", "Starcoder2ForCausalLM"),
    "GPT2LMHeadModel": ("loom.models.gpt2", "GPT2LMHeadModel"),
    "GPTNeoXForCausalLM": ("loom.models.gpt_neox", "GPTNeoXForCausalLM"),
    "FalconForCausalLM": ("loom.models.falcon", "FalconForCausalLM"),
    "GemmaForCausalLM": ("loom.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("loom.models.gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("loom.models.gemma3", "Gemma3ForCausalLM"),
    "Olmo2ForCausalLM": ("loom.models.olmo2", "Olmo2ForCausalLM"),
    "MixtralForCausalLM": ("loom.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("loom.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("loom.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    # vision-language
    "LlavaForConditionalGeneration": ("loom.models.llava", "LlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("loom.models.llava", "LlavaNextForConditionalGeneration"),
    "Idefics3ForConditionalGeneration": ("loom.models.idefics3", "Idefics3ForConditionalGeneration"),
    "SmolVLMForConditionalGeneration": ("loom.models.idefics3", "Idefics3ForConditionalGeneration"),
    "Gemma3ForConditionalGeneration": ("loom.models.gemma3_vlm", "Gemma3ForConditionalGeneration"),
    "PaliGemmaForConditionalGeneration": ("loom.models.paligemma", "PaliGemmaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("loom.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("loom.models.qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
}

_FALLBACK = ("loom.models.transformers_fallback", "TransformersForCausalLM")


def register(architecture: str, module: str, class_name: str) -> None:
    _REGISTRY[architecture] = (module, class_name)


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def vision_language_architectures() -> list[str]:
    return sorted(a for a in _REGISTRY if a.endswith("ForConditionalGeneration"))


def resolve_model_class(architecture: str, hf_config: dict[str, Any] | None = None,
                        trust_remote_code: bool = False) -> type[nn.Module]:
    """The class implementing `architecture`; with `hf_config` (config.json), an unregistered architecture that
    transformers runs as a causal LM resolves to the generic fallback, and so does one whose config maps to its own
    modeling code (`auto_map`) when `trust_remote_code` (TGI's rule; without it, TGI's refusal)."""
    entry = _REGISTRY.get(architecture)
    custom = (hf_config or {}).get("auto_map") or {}
    if entry is None and "AutoModelForCausalLM" in custom:
        if not trust_remote_code:
            raise ValueError(
                f"Unsupported model type {(hf_config or {}).get('model_type')}: its config.json maps to custom "
                f"modeling code ({custom['AutoModelForCausalLM']}); pass --trust-remote-code (TRUST_REMOTE_CODE=true) "
                "to run that code, after reading it"
            )
        logger.warning(
            "`trust_remote_code` is set: running the model's own code %s through the slower generic transformers "
            "path (over Loom's paged KV cache, no tensor parallelism)", custom["AutoModelForCausalLM"],
        )
        entry = _FALLBACK
    if entry is None and hf_config is not None:
        fallback = importlib.import_module(_FALLBACK[0])
        if fallback.transformers_can_run(architecture, hf_config):  # raises for encoder-decoder / multimodal
            logger.warning(
                "%s has no Loom implementation; it runs through the slower generic transformers path "
                "(transformers' modeling code over Loom's paged KV cache, no tensor parallelism)", architecture,
            )
            entry = _FALLBACK
    if entry is None:
        raise ValueError(
            f"Unsupported model architecture {architecture!r}. Supported: {', '.join(supported_architectures())}"
            " (and decoder-only causal LMs that transformers can load, through a slower generic path)"
        )
    module, class_name = entry
    return getattr(importlib.import_module(module), class_name)


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Refuse, before any rank starts, a tensor-parallel size the model's heads cannot be split into. (The
    layers check their other dimensions, e.g. the MLP width, as they are built.)"""
    if size < 1:
        raise ValueError(f"the tensor-parallel size must be >= 1, got {size}")
    if size == 1:
        return
    if config.architecture not in supported_architectures():
        raise ValueError(f"{config.architecture} runs through the generic transformers path, which has no tensor "
                         "parallelism; use one shard")
    heads = config.num_attention_heads
    if heads % size:
        raise ValueError(f"{config.architecture} has {heads} attention heads, which {size} tensor-parallel shards "
                         f"cannot split evenly; use a number of shards that divides {heads}")
    kv_head_range(config.num_kv_heads, TPGroup(0, size))
