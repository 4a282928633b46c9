"""Executes a StepPlan: builds the flattened batch and attention metadata, runs the model, returns logits.

Owns the model weights and the KV cache tensors of this rank. Knows nothing about requests' sampling or stopping.
"""

from __future__ import annotations

import torch

from loom.config import ModelConfig
from loom.distributed.parallel_state import get_tp_group
from loom.layers.kernels import paged_decode_cpu
from loom.layers.forward_context import AttentionMetadata, ForwardContext, PrefillSpan, forward_context
from loom.models.loader import load_model
from loom.protocol.plan import SeqPlan, StepPlan


class ModelRunner:
    def __init__(self, model_config: ModelConfig, num_blocks: int, block_size: int, device: str = "cpu"):
        self.model_config = model_config
        self.device = torch.device(device)
        self.block_size = block_size
        self.model = load_model(model_config, self.device)
        kv_heads = model_config.num_kv_heads // get_tp_group().size
        shape = (2, num_blocks * block_size, kv_heads, model_config.head_dim)
        # Zeroed, not empty: padded decode rows read slot 0 under a mask, and 0 × garbage could be NaN.
        self.kv_caches = [
            torch.zeros(shape, dtype=model_config.dtype, device=self.device) for _ in range(model_config.num_layers)
        ]
        self._block_offsets = torch.arange(block_size, device=self.device)
        if self.device.type == "cpu":
            paged_decode_cpu.load()  # compile (or load the cached build) now rather than in the first step

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run one step. Returns float32 logits in plan order: every position of `all_logits` seqs, the last
        position of other sampling seqs, nothing for the rest."""
        decodes = [s for s in plan.seqs if len(s.token_ids) == 1 and s.start > 0]
        prefills = [s for s in plan.seqs if not (len(s.token_ids) == 1 and s.start > 0)]
        ordered = decodes + prefills
        ids = torch.tensor([t for s in ordered for t in s.token_ids], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(s.start, s.start + len(s.token_ids)) for s in ordered]).to(self.device)
        meta = self._attention_metadata(decodes, prefills)
        with forward_context(ForwardContext(meta, self.kv_caches)):
            hidden = self.model(ids, positions)
        first_row, row = {}, 0
        for s in ordered:
            first_row[s.request_id] = row
            row += len(s.token_ids)
        rows: list[int] = []
        for s in plan.seqs:
            start, n = first_row[s.request_id], len(s.token_ids)
            if s.all_logits:
                rows.extend(range(start, start + n))
            elif s.sample:
                rows.append(start + n - 1)
        if not rows:
            return torch.empty(0, self.model_config.vocab_size)
        return self.model.compute_logits(hidden[rows]).float()

    def _slots(self, block_ids: list[int], num_positions: int) -> torch.Tensor:
        blocks = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return (blocks.unsqueeze(1) * self.block_size + self._block_offsets).flatten()[:num_positions]

    def _attention_metadata(self, decodes: list[SeqPlan], prefills: list[SeqPlan]) -> AttentionMetadata:
        slot_parts: list[torch.Tensor] = []
        tables = lens = None
        if decodes:
            max_blocks = max(len(s.block_ids) for s in decodes)
            tables = torch.tensor([s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in decodes],
                                  dtype=torch.int32)
            lens = torch.tensor([s.start + 1 for s in decodes], dtype=torch.int32)
            last = lens.long() - 1  # position of each decode's new token
            new_slots = tables.long().gather(1, (last // self.block_size).unsqueeze(1)).squeeze(1)
            slot_parts.append(new_slots * self.block_size + last % self.block_size)
            tables, lens = tables.to(self.device), lens.to(self.device)
        spans, row = [], len(decodes)
        for s in prefills:
            ctx_len = s.start + len(s.token_ids)
            slots = self._slots(s.block_ids, ctx_len)
            spans.append(PrefillSpan(row, len(s.token_ids), ctx_len, slots))
            slot_parts.append(slots[s.start :].cpu())
            row += len(s.token_ids)
        slot_mapping = torch.cat(slot_parts).to(self.device)
        return AttentionMetadata(slot_mapping, len(decodes), tables, lens, spans, self.block_size)
