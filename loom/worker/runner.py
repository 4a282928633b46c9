"""Executes a StepPlan: builds the flattened batch and attention metadata, runs the model, returns logits.

Owns the model weights and the KV cache tensors of this rank. Knows nothing about requests' sampling or stopping.

With tensor parallelism the runner is where the ranks meet: rank 0's runner sends each model load and each plan to
the other ranks (`worker/tp_worker.py` runs their loop) before running its own shard, so the engine above it is
the same whatever the number of ranks.
"""

from __future__ import annotations

import logging
import math
import mmap
import threading
import time

import torch
import torch.distributed as dist

from loom.config import ModelConfig
from loom.distributed.comm import RankFailure, broadcast_message
from loom.distributed.parallel_state import get_tp_group, kv_head_range
from loom.layers.forward_context import AttentionMetadata, ForwardContext, PrefillSpan, forward_context
from loom.layers.kernels.build import prebuild
from loom.layers.linear import PackableLinear, pack_linear_weights
from loom.models.loader import load_model
from loom.protocol import shard
from loom.protocol.plan import SeqPlan, StepPlan

logger = logging.getLogger(__name__)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor for the KV cache. Zeroed, not empty: padded decode rows read slot 0 under a mask, and
    0 × garbage could be NaN. On a CPU the memory is an anonymous mapping, which the OS fills with zeros page by
    page on first touch: the default cache of several GB costs nothing at start-up (torch.zeros wrote all of it:
    8 s of a 14 s start on the bench model) and only the pages in use become resident."""
    if device.type != "cpu" or math.prod(shape) == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, num_blocks: int, block_size: int, device: str = "cpu"):
        self.model_config = model_config
        self.device = torch.device(device)
        self.block_size = block_size
        self.tp = get_tp_group()
        if self.tp.size > 1 and self.tp.is_driver:
            dtype = str(model_config.dtype).removeprefix("torch.")
            self._send(shard.LoadModel(str(model_config.path), dtype, model_config.architecture, num_blocks,
                                       block_size, model_config.quantize))
        # CPU kernels compile (first start on a machine) or load from the cache while the weights load
        kernels = threading.Thread(target=prebuild, name="loom-kernel-build", daemon=True)
        if self.device.type == "cpu":
            kernels.start()
        self.model = load_model(model_config, self.device)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.rank_weight_bytes = self._gather_weight_bytes()  # also the point where every rank has its shard
        if self.tp.size > 1 and self.tp.is_driver:
            logger.info("tensor parallel over %d ranks; weights per rank: %s MB", self.tp.size,
                        ", ".join(f"{b / 1e6:.1f}" for b in self.rank_weight_bytes))
        if kernels.is_alive():
            kernels.join()
        packed = pack_linear_weights(self.model)  # after the byte count: packing releases the plain weights
        if packed:
            logger.info("%d linear layers use packed bf16 weights", packed)
        kv_heads = kv_head_range(model_config.num_kv_heads, self.tp)[1]
        shape = (2, num_blocks * block_size, kv_heads, model_config.head_dim)
        self.kv_caches = [zeroed(shape, model_config.dtype, self.device) for _ in range(model_config.num_layers)]
        self._block_offsets = torch.arange(block_size, device=self.device)

    @torch.inference_mode()
    def linear_tokens_per_second(self, rows: int = 256) -> float | None:
        """Tokens per second this rank's linear layers (all but the LM head) compute at `rows` tokens per step:
        each distinct weight shape timed once (best of two) on random input, weighted by how many layers have it.
        About 0.1 s on a CPU; it sizes the default prefill budget. None for a model without such layers (the
        transformers fallback)."""
        shapes: dict[tuple[int, int], tuple[PackableLinear, int]] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, PackableLinear) and not name.endswith("lm_head"):
                key = module.features
                layer, count = shapes.get(key, (module, 0))
                shapes[key] = (layer, count + 1)
        seconds = 0.0
        for (in_features, _), (layer, count) in shapes.items():
            x = torch.randn(rows, in_features, device=self.device).to(self.model_config.dtype)
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                layer.matmul(x)
                best = min(best, time.perf_counter() - start)
            seconds += best * count
        return rows / seconds if seconds > 0 else None

    def _send(self, msg: shard.Message) -> None:
        broadcast_message(self.tp, *shard.encode(msg))

    def _gather_weight_bytes(self) -> list[int]:
        """Every rank's parameter bytes, in rank order (logged at start-up; tests check the shards' sizes)."""
        if self.tp.size == 1:
            return [self.weight_bytes]
        mine = torch.tensor([self.weight_bytes], dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.tp.size)]
        try:
            dist.all_gather(parts, mine, group=self.tp.control)
        except RuntimeError as err:
            raise RankFailure(f"a tensor-parallel rank failed to load its shard: {err}") from err
        return [int(p) for p in parts]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run one step (on rank 0: for every rank). Returns float32 logits in plan order: every position of
        `all_logits` seqs, the last position of other sampling seqs, nothing for the rest."""
        if self.tp.size == 1:
            return self.forward(plan)  # type: ignore[return-value]
        self._send(plan)
        try:
            logits = self.forward(plan)
        except Exception as err:
            # The other ranks may be waiting in a collective this rank never reached: the group is out of step.
            raise RankFailure(f"tensor-parallel step failed on rank 0: {err}") from err
        assert logits is not None
        return logits

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor | None:
        """This rank's part of one step; the logits (see `execute`) on rank 0, None on the others."""
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
        logits = self.model.compute_logits(hidden[rows])  # gathered to rank 0
        return None if logits is None else logits.float()

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
