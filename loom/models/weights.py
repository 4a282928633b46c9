"""Mapping checkpoint tensors onto a model's parameters: shared by every family's `load_weights`.

A family supplies one function from a checkpoint name (and tensor) to where it goes — the parameter name, the shard
id for fused parameters, and the tensor (possibly wrapped, e.g. transposed) — or None to skip it. Names that map
to no parameter raise, so a checkpoint with leftovers never loads silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from loom.layers.linear import CheckpointTensor

Placement = tuple[str, Any, CheckpointTensor]  # (parameter name, shard id, tensor to load)

# HF checkpoint names that land in one of the Llama-style fused parameters: (hf fragment, ours, shard id)
LLAMA_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


def stacked_name(name: str, stacked: tuple[tuple[str, str, Any], ...] = LLAMA_STACKED) -> tuple[str, Any]:
    """(our parameter name, shard id) for a checkpoint name; shard None when it maps one to one."""
    for hf_part, ours, shard_id in stacked:
        if hf_part in name:
            return name.replace(hf_part, ours), shard_id
    return name, None


def is_skipped_buffer(name: str, tie_word_embeddings: bool) -> bool:
    """Rotary inverse frequencies some checkpoints saved (recomputed here), and a tied LM head's duplicate."""
    return "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and tie_word_embeddings)


# fp8-KV checkpoints (compressed-tensors, FP8 exports) carry per-layer scales of the cached keys and values:
# `<attention module>.k_scale` / `.v_scale`, or one `.kv_scale` for both. They apply to an fp8 cache only.
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")


def load_kv_scale(model: nn.Module, name: str, tensor: CheckpointTensor) -> None:
    """Give a checkpoint's KV-cache scale to the layer's `Attention` (a child `attn` of the named module)."""
    prefix, _, which = name.rpartition(".")
    modules = dict(model.named_modules())
    attn = modules.get(f"{prefix}.attn") or modules.get(prefix)
    if attn is None or not hasattr(attn, "k_scale"):
        raise ValueError(f"Checkpoint tensor {name!r} has no attention layer in {type(model).__name__}")
    value = float(tensor.full().float().reshape(-1).max())  # per-tensor (a per-head list: its largest)
    if which in ("k_scale", "kv_scale"):
        attn.k_scale = value
    if which in ("v_scale", "kv_scale"):
        attn.v_scale = value


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, CheckpointTensor]],
                    place: Callable[[str, CheckpointTensor], Placement | None]) -> dict[str, set]:
    """Copy each tensor where `place` says; returns each loaded parameter's shard ids (for the completeness check)."""
    params = dict(model.named_parameters())
    loaded: dict[str, set] = {}
    for name, tensor in weights:
        if name.endswith(KV_SCALE_SUFFIXES):
            load_kv_scale(model, name, tensor)
            continue
        placement = place(name, tensor)
        if placement is None:
            continue
        target, shard, value = placement
        param = params.get(target)
        if param is None:
            raise ValueError(f"Checkpoint tensor {name!r} has no place in {type(model).__name__}")
        param.weight_loader(param, value, shard)
        loaded.setdefault(target, set()).add(shard)
    return loaded


def llama_style_loader(model: nn.Module, weights: Iterable[tuple[str, CheckpointTensor]],
                       stacked: tuple[tuple[str, str, Any], ...] = LLAMA_STACKED) -> dict[str, set]:
    """The common case: skip rotary buffers and a tied head, map q/k/v and gate/up into fused parameters."""
    tied = bool(getattr(model, "tie_word_embeddings", False))

    def place(name: str, tensor: CheckpointTensor) -> Placement | None:
        if is_skipped_buffer(name, tied):
            return None
        target, shard = stacked_name(name, stacked)
        return target, shard, tensor

    return load_checkpoint(model, weights, place)
