"""Per-step state every attention layer reads: where this step's tokens sit in the paged KV cache.

The runner builds one `AttentionMetadata` per step and installs it with `forward_context(...)`; attention layers
read it through `get_forward_context()`. It lives here, below both the runner and the layers, so that neither has
to import the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class PrefillSpan:
    """One sequence computing `q_len` new tokens this step (a prompt chunk, or a recompute after preemption).

        KV positions: [0 ........ ctx_len - q_len | ctx_len - q_len ...... ctx_len)
                       already in the cache          computed this step (rows start..start+q_len)
    """

    start: int  # first row of this sequence in the flattened batch
    q_len: int
    ctx_len: int  # tokens in the cache once this step's K/V are written
    slots: torch.Tensor  # (ctx_len,) flat KV slots of positions 0..ctx_len-1
    # position ranges [a, b) whose tokens attend to each other both ways (Gemma 3's image tokens, PaliGemma's
    # whole prompt), each with all of its positions computed by this step or before it
    bidirectional: list[tuple[int, int]] = field(default_factory=list)
    # a sliding-window layer's window bounds the ranges too (Gemma 3: AND(window, OR(causal, block))); False: the
    # ranges are open past it (PaliGemma: transformers ORs the prefix block into the sliding-window mask)
    window_bounds_bidirectional: bool = True


@dataclass(slots=True)
class AttentionMetadata:
    """Flattened batch layout: rows [0, num_decodes) are single-token decodes, then the prefill spans."""

    slot_mapping: torch.Tensor  # (T,) flat KV slot of each row's new key/value
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # (Bd, max_blocks) int32 block ids, padded with block 0
    decode_lens: torch.Tensor | None  # (Bd,) int32 context length (including the new token)
    prefills: list[PrefillSpan]
    block_size: int = 16
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _decode_slots: torch.Tensor | None = None

    @property
    def decode_slots(self) -> torch.Tensor:
        """(Bd, Lmax) slots each decode attends to, padded with slot 0 — only built for the gather path."""
        if self._decode_slots is None:
            assert self.decode_block_tables is not None and self.decode_lens is not None
            bt = self.decode_block_tables.long()
            offsets = torch.arange(self.block_size, device=bt.device)
            slots = (bt.unsqueeze(2) * self.block_size + offsets).view(bt.shape[0], -1)
            self._decode_slots = slots[:, : int(self.decode_lens.max())]
        return self._decode_slots

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """(Bd, 1, 1, Lmax) bool, True where a decode row may attend; shared by all layers of one kind."""
        mask = self._decode_masks.get(window)
        if mask is None:
            assert self.decode_lens is not None
            keys = torch.arange(self.decode_slots.shape[1], device=self.decode_lens.device)
            lens = self.decode_lens.long().unsqueeze(1)
            mask = keys.unsqueeze(0) < lens
            if window is not None:
                # the query sits at position len-1; transformers keeps keys with q - k < window
                mask &= keys.unsqueeze(0) > lens - 1 - window
            mask = mask[:, None, None, :]
            self._decode_masks[window] = mask
        return mask


@dataclass(slots=True)
class ForwardContext:
    attn: AttentionMetadata
    kv_caches: list[torch.Tensor]  # per layer: (2, num_slots, num_kv_heads, head_dim)
    lora: Any = None  # layers/lora.py LoraRows: the rows of each LoRA adapter this step (None: no adapters)


_CONTEXT: ForwardContext | None = None


def current_forward_context() -> ForwardContext | None:
    """The step's context, or None outside a forward (e.g. a layer timed on its own)."""
    return _CONTEXT


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("attention ran outside forward_context(); the runner must install the step's metadata")
    return _CONTEXT


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    try:
        yield
    finally:
        _CONTEXT = prev
