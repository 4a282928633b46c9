"""Generic fallback: any decoder-only architecture `transformers` can run and Loom has no own implementation for.

Like TGI's `TransformersFlashCausalLM`, the model is transformers' own (`from_pretrained`) with one change: its
attention layers call `paged_attention_forward`, registered in transformers' `AttentionInterface` as
`ATTN_IMPLEMENTATION`. That function writes the layer's K/V into Loom's paged cache and attends per sequence with
Loom's `Attention`, reading the step's metadata from the forward context. The whole flattened step runs as one
batch row: `input_ids[None]`, `position_ids = positions[None]`, no transformers cache.

Slower than an own implementation (separate q/k/v and gate/up projections, transformers' module overhead) and
without tensor parallelism, so the registry logs a warning whenever it picks this path.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from loom.config import ModelConfig
from loom.distributed.parallel_state import get_tp_group
from loom.layers.attention import Attention
from loom.layers.forward_context import get_forward_context

ATTN_IMPLEMENTATION = "loom_paged"

# Layer types whose whole state is a K/V per token, i.e. what the paged cache holds. Anything else (linear
# attention, Mamba/conv state, chunked attention, shared-KV "dummy" layers) would be silently wrong here.
_PAGED_LAYER_TYPES = {"full_attention", "sliding_attention"}

# Keyword arguments transformers' models pass to an attention function that carry no attention semantics here
# (they are plumbing for other implementations). Any other keyword with a value is refused rather than ignored.
_PLUMBING_KWARGS = {
    "position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value", "output_attentions",
    "output_hidden_states", "return_dict", "position_embeddings", "is_causal",
}

# Per transformers attention module: the Loom `Attention` it forwards to (created on the module's first call).
_LAYER_ATTENTION: weakref.WeakKeyDictionary[nn.Module, Attention] = weakref.WeakKeyDictionary()
# Layers that went through `paged_attention_forward` during the current forward (checked by the model).
_RAN_LAYERS: set[int] = set()


def transformers_can_run(architecture: str, hf: dict[str, Any]) -> bool:
    """Whether `architecture` is transformers' causal-LM class for this config's `model_type`. Raises ValueError
    for the kinds of models this path refuses outright (encoder-decoder, multimodal)."""
    if hf.get("is_encoder_decoder"):
        raise ValueError(f"{architecture} is an encoder-decoder model; Loom serves decoder-only language models")
    for key in ("vision_config", "audio_config"):
        if hf.get(key) is not None:
            from loom.models.registry import vision_language_architectures

            raise ValueError(
                f"{architecture} is a multimodal model (config.json has `{key}`) that Loom does not implement; "
                f"the vision-language architectures it serves: {', '.join(vision_language_architectures())}"
            )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf.get("model_type", "")) == architecture


def paged_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
    sliding_window: int | None = None, softcap: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query: (1, Hq, T, D); key, value: (1, Hkv, T, D), already
    rotated → ((1, T, Hq, D), no weights). T is the whole flattened step."""
    if attention_mask is not None:
        # a model that passes a mask built it some other way than masking_utils (see the NOTE at the
        # registration below); what it means beyond causality cannot be carried over to the paged layout
        raise ValueError(f"{type(module).__name__} builds its own attention mask; the generic path cannot use it")
    extra = {k: v for k, v in kwargs.items() if k not in _PLUMBING_KWARGS and v is not None}
    if extra:
        raise ValueError(f"{type(module).__name__} passes attention options the generic path does not "
                         f"implement: {sorted(extra)}")
    attn = _layer_attention(module, query, key, value, scaling, sliding_window, softcap)
    cache_dtype = get_forward_context().kv_caches[attn.layer_idx].dtype
    q = query[0].transpose(0, 1).to(cache_dtype)  # (T, Hq, D)
    k = key[0].transpose(0, 1).to(cache_dtype)  # (T, Hkv, D)
    v = value[0].transpose(0, 1).to(cache_dtype)
    out = attn(q, k, v)  # (T, Hq, D)
    _RAN_LAYERS.add(attn.layer_idx)
    return out.to(query.dtype).unsqueeze(0), None  # (1, T, Hq, D)


def _layer_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
    sliding_window: int | None, softcap: float | None,
) -> Attention:
    attn = _LAYER_ATTENTION.get(module)
    if attn is not None:
        return attn
    name = type(module).__name__
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(f"{name} has no `layer_idx`; the generic path cannot pick its KV cache")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{name} is not causal; Loom serves causal decoders only")
    caches = get_forward_context().kv_caches
    num_heads, num_kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[-1]
    fits = layer_idx < len(caches) and tuple(caches[layer_idx].shape[2:]) == (num_kv_heads, head_dim)
    if not fits or value.shape[-1] != head_dim:
        cache_desc = f"{len(caches)} layers of {tuple(caches[0].shape[2:])}" if caches else "no layers"
        raise ValueError(
            f"{name} layer {layer_idx} has {num_kv_heads} KV heads, key dim {head_dim}, value dim {value.shape[-1]}, "
            f"but the KV cache (sized from config.json's num_hidden_layers / num_key_value_heads / head_dim) has "
            f"{cache_desc}; Loom's ModelConfig does not read this architecture's geometry"
        )
    scale = float(scaling) if scaling is not None else head_dim**-0.5
    attn = Attention(
        layer_idx, num_heads, num_kv_heads, head_dim, scale, sliding_window=sliding_window, softcap=softcap
    )
    _LAYER_ATTENTION[module] = attn
    return attn


# NOTE: registered in AttentionInterface only, deliberately not in AttentionMaskInterface: for implementations
# missing there, masking_utils' create_causal_mask / create_sliding_window_causal_mask return None without building
# anything, so the flattened step never gets a (T x T) mask; causality and windows come from Loom's metadata.
AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


class TransformersForCausalLM(nn.Module):
    """A transformers causal LM run over Loom's flattened batch and paged KV cache. Loads itself."""

    def __init__(self, hf_model: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.hf = hf_model

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> TransformersForCausalLM:
        import transformers

        arch = cfg.architecture
        if get_tp_group().size > 1:
            raise ValueError(f"{arch} runs through the generic transformers path, which has no tensor parallelism; "
                             "serve it with --num-shard 1")
        remote = cfg.trust_remote_code and "AutoModelForCausalLM" in (cfg.get("auto_map") or {})
        if remote:  # the checkpoint's own modeling code (--trust-remote-code)
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            hf_cls = get_class_from_dynamic_module(cfg.get("auto_map")["AutoModelForCausalLM"], str(cfg.path),
                                                   local_files_only=True)
        else:
            hf_cls = getattr(transformers, arch)
        if not hf_cls._can_set_attn_implementation():
            raise ValueError(f"{arch}'s attention does not go through transformers' AttentionInterface, so the "
                             "generic path cannot run it over Loom's paged KV cache")
        hf_config = transformers.AutoConfig.from_pretrained(str(cfg.path), local_files_only=True,
                                                            trust_remote_code=remote)
        _check_layer_types(arch, hf_config)
        model, info = hf_cls.from_pretrained(
            str(cfg.path), config=hf_config, dtype=cfg.dtype, attn_implementation=ATTN_IMPLEMENTATION,
            output_loading_info=True, local_files_only=True, trust_remote_code=remote,
        )
        problems = {k: sorted(map(str, info[k]))[:10] for k in ("missing_keys", "unexpected_keys",
                                                                  "mismatched_keys", "error_msgs") if info[k]}
        if problems:
            raise ValueError(f"Checkpoint does not match transformers' {arch}: {problems}")
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"transformers kept attn_implementation={model.config._attn_implementation!r} for {arch}")
        return cls(model.to(device), cfg)

    @property
    def decoder(self) -> nn.Module:
        """The module returning the final hidden states (LlamaModel, OPTDecoder, ...)."""
        return self.hf.get_decoder()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T,) ids and positions → (T, hidden) final hidden states."""
        _RAN_LAYERS.clear()
        out = self.decoder(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        if _RAN_LAYERS != set(range(self.config.num_layers)):
            raise RuntimeError(
                f"{self.config.architecture}: layers {sorted(_RAN_LAYERS)} ran through Loom's paged attention, "
                f"expected 0..{self.config.num_layers - 1}; this model cannot use the generic path"
            )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) → (N, vocab), including whatever the architecture does after its head (Granite's
        logits_scaling, Cohere's logit_scale, soft-capping): transformers' own forward runs with the decoder
        answering with `hidden`."""
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        decoder, called = self.decoder, []

        def precomputed(*args: Any, **kwargs: Any) -> BaseModelOutputWithPastAndCrossAttentions:
            called.append(True)
            return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden[None])  # (1, N, hidden)

        # NOTE: an instance attribute shadows the class's forward for this one call; deleting it restores it.
        decoder.forward = precomputed
        try:
            dummy_ids = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
            logits = self.hf(input_ids=dummy_ids, use_cache=False).logits  # (1, N, vocab)
        finally:
            del decoder.forward
        if not called:
            raise RuntimeError(f"{self.config.architecture}'s forward does not go through get_decoder()")
        return logits[0]


def _check_layer_types(arch: str, hf_config: Any) -> None:
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(hf_config.get_text_config(decoder=True))
    unsupported = sorted(set(layer_types) - _PAGED_LAYER_TYPES)
    if unsupported:
        raise ValueError(f"{arch} has {unsupported} layers, whose state Loom's paged KV cache cannot hold; "
                         "the generic path supports full and sliding-window attention only")
