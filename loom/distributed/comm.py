"""The torch.distributed process group of the engine ranks, and rank 0's control channel to the others.

    rank 0 ──control (gloo)──▶ ranks 1..N-1     one message per model load / engine step / shutdown
           ◀──model (gloo|NCCL)──▶              all-reduces inside the parallel layers, logits gathered to rank 0

The control group has its own (very long) timeout: ranks 1..N-1 wait in it for as long as the server is idle.
A dead peer closes its sockets, so a rank blocked in either group fails within moments rather than at a timeout.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from loom.distributed.parallel_state import TPGroup, set_tp_group

logger = logging.getLogger(__name__)

# Ranks 1..N-1 block in the control group between steps, so it must outlast any idle period.
CONTROL_TIMEOUT = timedelta(days=3650)
# Rendezvous and the model's collectives: a rank that has not shown up or answered by then is gone.
MODEL_TIMEOUT = timedelta(minutes=30)


class RankFailure(RuntimeError):
    """A collective failed or a rank fell out of step: the group cannot be trusted any more, so the engine must
    stop rather than serve on (the launcher then takes the whole server down)."""


@dataclass(frozen=True)
class DistributedConfig:
    """Where this rank sits: torchrun's environment names (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK, LOCAL_WORLD_SIZE), which the launcher also sets for each engine rank, as TGI's does."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "localhost"
    master_port: int = 29500
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistributedConfig:
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, env.get("MASTER_ADDR", "localhost"), int(env.get("MASTER_PORT", "29500")),
                   int(env.get("LOCAL_RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", str(world))))


def init_distributed(config: DistributedConfig, device: str = "cpu", store: dist.Store | None = None) -> TPGroup:
    """Join the group (gloo on CPU, NCCL on CUDA), create the control group and make them this process's
    tensor-parallel group. Returns it."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one host share its cores: each takes its share instead of all of them (oversubscribed
        # threads make every collective wait on a descheduled peer).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, config.local_world_size)))
    kwargs = {"store": store} if store is not None else {
        "init_method": f"tcp://{config.master_addr}:{config.master_port}"}
    logger.info("rank %d/%d joining the %s group at %s:%d", config.rank, config.world_size, backend,
                config.master_addr, config.master_port)
    dist.init_process_group(backend, rank=config.rank, world_size=config.world_size, timeout=MODEL_TIMEOUT,
                            **kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    group = TPGroup(config.rank, config.world_size, dist.group.WORLD, control)
    set_tp_group(group)
    return group


def destroy_distributed() -> None:
    set_tp_group(TPGroup())
    # NOTE: layers keep the group handles and sit in reference cycles (parameters' bound weight loaders): collect
    # dropped models now, or their process groups are freed during interpreter exit, which aborts the process.
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_message(tp: TPGroup, kind: int = 0, payload: bytes = b"") -> tuple[int, bytes]:
    """Rank 0 sends (kind, payload) to every rank; the others pass nothing and get it back.

    Two broadcasts: a header (kind, length), then the bytes. Raises RankFailure when a peer is gone.
    """
    try:
        header = torch.tensor([kind, len(payload)], dtype=torch.int64)
        dist.broadcast(header, group=tp.control, group_src=0)
        kind, size = int(header[0]), int(header[1])
        if size == 0:
            return kind, b""
        if tp.is_driver:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            data = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(data, group=tp.control, group_src=0)
        return kind, payload if tp.is_driver else data.numpy().tobytes()
    except RuntimeError as err:
        raise RankFailure(f"tensor-parallel control channel failed on rank {tp.rank}: {err}") from err
