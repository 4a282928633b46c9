"""Tensor-parallel group state: which rank this process is and how many share the model.

Set once per process before the model is built (`loom.distributed.comm.init_distributed`). With the default (one
rank) every parallel layer short-circuits its collectives, so single-process code pays nothing for being
tensor-parallel ready.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # the model's collectives: gloo on CPU, NCCL on CUDA
    control: dist.ProcessGroup | None = None  # gloo: rank 0's messages to the others (plans, model loads)

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and tells the other ranks what to run."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate each rank's shard of the last dimension on rank 0; the other ranks get None."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        dist.gather(x.contiguous(), parts, group=self.group, group_dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None


_TP = TPGroup()


def get_tp_group() -> TPGroup:
    return _TP


def set_tp_group(group: TPGroup) -> None:
    global _TP
    _TP = group


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def kv_head_range(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(first key/value head, count) held by `tp.rank`.

    Heads are split when the ranks divide them; with more ranks than heads (multi-query Falcon, or 2 KV heads on
    4 ranks) each rank keeps a copy of the one head its query heads read:

        8 kv heads, 2 ranks:  rank 0 → heads 0-3, rank 1 → heads 4-7
        2 kv heads, 4 ranks:  ranks 0, 1 → head 0; ranks 2, 3 → head 1   (head = rank · kv / tp)
    """
    if num_kv_heads % tp.size == 0:
        count = num_kv_heads // tp.size
        return tp.rank * count, count
    if tp.size % num_kv_heads == 0:
        return tp.rank * num_kv_heads // tp.size, 1
    raise ValueError(
        f"key/value heads ({num_kv_heads}) cannot be shared by {tp.size} tensor-parallel ranks: the number of "
        "ranks must divide the key/value heads or be a multiple of them"
    )
