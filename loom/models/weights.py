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


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, CheckpointTensor]],
                    place: Callable[[str, CheckpointTensor], Placement | None]) -> dict[str, set]:
    """Copy each tensor where `place` says; returns each loaded parameter's shard ids (for the completeness check)."""
    params = dict(model.named_parameters())
    loaded: dict[str, set] = {}
    for name, tensor in weights:
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
