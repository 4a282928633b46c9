"""A draft model for speculative decoding (`--draft-model-id`, as vLLM and llama.cpp have it): a small model with
the target's tokenizer, run by the runner of rank 0 next to the target.

Its KV cache has as many slots as the target's and is addressed by the same block tables: every step, the draft
model runs over the same tokens and positions as the target (`mirror`), so whatever positions the target's cache
holds, the draft's holds too: prefix-cache hits, chunked prefill and preemption need nothing of their own. After
the step's tokens are chosen, `propose` runs k greedy decode steps of the draft model from each request's newest
token; those are the next step's drafts. A draft's K/V is written at the position it will occupy, inside the
blocks the request already has (a request whose table ends sooner gets fewer drafts); positions whose drafts the
target rejects are written again before anything reads them, as in the target's cache.
"""

from __future__ import annotations

import logging

import torch

from loom.config import ModelConfig
from loom.layers.forward_context import AttentionMetadata, ForwardContext, forward_context
from loom.models.loader import load_model

logger = logging.getLogger(__name__)


class DraftModel:
    def __init__(self, config: ModelConfig, num_slots: int, block_size: int, device: torch.device):
        self.config = config
        self.block_size = block_size
        self.device = device
        self.model = load_model(config, device)
        shape = (2, num_slots, config.num_kv_heads, config.head_dim)
        from loom.worker.runner import zeroed  # the same lazily zeroed memory as the target's cache

        self.kv_caches = [zeroed(shape, config.dtype, device) for _ in range(config.num_layers)]
        logger.info("draft model %s (%s): %.1f M parameters", config.path, config.architecture,
                    sum(p.numel() for p in self.model.parameters()) / 1e6)

    def mirror(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Compute the target's step positions with the draft model: only their K/V are kept."""
        with forward_context(ForwardContext(meta, self.kv_caches)):
            self.model(ids, positions)

    def propose(self, tables: list[list[int]], starts: list[int], tokens: list[int], k: int) -> list[list[int]]:
        """Greedy drafts for each request: `tokens[i]` sits at position `starts[i]`; up to k tokens after it,
        fewer where the request's block table ends."""
        drafts: list[list[int]] = [[] for _ in tokens]
        live = list(range(len(tokens)))
        current = list(tokens)
        for step in range(k):
            live = [i for i in live if starts[i] + step < len(tables[i]) * self.block_size]
            if not live:
                break
            positions = [starts[i] + step for i in live]
            meta = self._decode_metadata([tables[i] for i in live], positions)
            ids = torch.tensor([current[i] for i in live], dtype=torch.long, device=self.device)
            with forward_context(ForwardContext(meta, self.kv_caches)):
                hidden = self.model(ids, torch.tensor(positions, device=self.device))
                logits = self.model.compute_logits(hidden)
            assert logits is not None
            for i, token in zip(live, logits.argmax(dim=-1).tolist()):
                drafts[i].append(token)
                current[i] = token
        return drafts

    def _decode_metadata(self, tables: list[list[int]], positions: list[int]) -> AttentionMetadata:
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.long)
        slots = table.long().gather(1, (pos // self.block_size).unsqueeze(1)).squeeze(1) * self.block_size \
            + pos % self.block_size
        lens = (pos + 1).to(torch.int32)
        return AttentionMetadata(slots.to(self.device), len(tables), table.to(self.device), lens.to(self.device), [],
                                 self.block_size)
