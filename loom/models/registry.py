"""Maps the HF `architectures` string of a checkpoint to the class that implements it."""

from __future__ import annotations

from torch import nn

from loom.models import llama

_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": llama.LlamaForCausalLM,
    "MistralForCausalLM": llama.MistralForCausalLM,
    "Qwen2ForCausalLM": llama.Qwen2ForCausalLM,
    "Qwen3ForCausalLM": llama.Qwen3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve_model_class(architecture: str) -> type[nn.Module]:
    cls = _REGISTRY.get(architecture)
    if cls is None:
        raise ValueError(
            f"Unsupported model architecture {architecture!r}. Supported: {', '.join(supported_architectures())}"
        )
    return cls
