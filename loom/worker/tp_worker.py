"""Ranks 1..N-1 of a tensor-parallel engine: they hold a shard of the model and follow rank 0.

    rank 0 (EngineCore → ModelRunner)             rank r (run_worker)
      ModelRunner(...)      ── LoadModel ──▶      ModelRunner(...) on the same model and KV geometry
      ModelRunner.execute   ── StepPlan  ──▶      runner.follow(plan): the same collectives; logits go to rank 0
      stop_workers()        ── Shutdown  ──▶      leave the loop

Ranks come from three places: the launcher (`loom shard` processes on the same host), another host (`loom shard`
with torchrun's environment variables), or `loom.LLM(..., tensor_parallel_size=N)` (`LocalRanks`: processes
spawned by the caller, which becomes rank 0).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

import torch
import torch.distributed as dist

from loom.config import ModelConfig
from loom.distributed.comm import (
    MODEL_TIMEOUT,
    DistributedConfig,
    RankFailure,
    broadcast_message,
    destroy_distributed,
    init_distributed,
)
from loom.distributed.parallel_state import get_tp_group
from loom.protocol import shard
from loom.protocol.plan import StepPlan
from loom.worker.runner import ModelRunner

logger = logging.getLogger(__name__)
JOIN_TIMEOUT_SECONDS = 300  # spawned ranks import torch and connect; a rank that has not joined by then is stuck
STOP_TIMEOUT_SECONDS = 10


def run_worker(device: str = "cpu", model_dir: str | None = None) -> None:
    """Follow rank 0 until it sends Shutdown. `model_dir` replaces rank 0's path (a copy on another host)."""
    tp = get_tp_group()
    runner: ModelRunner | None = None
    while True:
        msg = shard.decode(*broadcast_message(tp))
        if isinstance(msg, shard.LoadModel):
            runner = None  # free the previous model and KV cache before building the next
            runner = _load(msg, device, model_dir)
            logger.info("rank %d: %s shard loaded (%.1f MB of weights)", tp.rank, msg.architecture,
                        runner.weight_bytes / 1e6)
        elif isinstance(msg, StepPlan):
            if runner is None:
                raise RankFailure(f"rank {tp.rank}: a step arrived before any model was loaded")
            runner.follow(msg)
        else:
            logger.info("rank %d: shutting down", tp.rank)
            return


def _load(msg: shard.LoadModel, device: str, model_dir: str | None) -> ModelRunner:
    config = ModelConfig.from_dir(model_dir or msg.model_dir, msg.dtype, msg.quantize,
                                  tuple(msg.rope) if msg.rope else None)  # type: ignore[arg-type]
    if config.architecture != msg.architecture:
        raise ValueError(f"rank {get_tp_group().rank}: {config.path} is a {config.architecture}, but rank 0 "
                         f"loads a {msg.architecture}; every rank needs the same model")
    kv_dtype = getattr(torch, msg.kv_cache_dtype) if msg.kv_cache_dtype else None
    return ModelRunner(config, msg.num_blocks, msg.block_size, device, kv_cache_dtype=kv_dtype)


def stop_workers() -> None:
    """On rank 0: end the other ranks' loops. A no-op with one rank."""
    tp = get_tp_group()
    if tp.size > 1 and tp.is_driver:
        broadcast_message(tp, *shard.encode(shard.Shutdown()))


def rank_device(device: str, rank: int) -> str:
    """One GPU per rank (cuda → cuda:rank); CPU ranks share the host."""
    d = torch.device(device)
    return f"cuda:{rank}" if d.type == "cuda" and d.index is None else device


def serve_rank(config: DistributedConfig, device: str = "cpu", model_dir: str | None = None) -> None:
    """A whole worker-rank process: join the group, follow rank 0, leave."""
    init_distributed(config, rank_device(device, config.local_rank))
    try:
        run_worker(rank_device(device, config.local_rank), model_dir)
    finally:
        destroy_distributed()


class LocalRanks:
    """Ranks 1..N-1 as spawned children of this process, which becomes rank 0 (`loom.LLM`).

    Rendezvous goes through a TCP store this process hosts on a free port: each child checks in before joining
    the group, so a child that dies while starting is reported instead of leaving rank 0 waiting.
    """

    def __init__(self, world_size: int, device: str = "cpu"):
        self._threads = torch.get_num_threads()
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                              timeout=MODEL_TIMEOUT)
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=_spawned_rank, args=(r, world_size, store.port, device), daemon=True,
                        name=f"loom-tp-rank-{r}")
            for r in range(1, world_size)
        ]
        for p in self.procs:
            p.start()
        try:
            self._wait_joined(store)
            init_distributed(DistributedConfig(0, world_size, "127.0.0.1", store.port, 0, world_size),
                             rank_device(device, 0), store)
        except BaseException:
            self._kill()
            raise

    def _wait_joined(self, store: dist.TCPStore) -> None:
        keys = [f"loom/joined/{p.name}" for p in self.procs]
        deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
        while not store.check(keys):
            for p in self.procs:
                if p.exitcode is not None:
                    raise RuntimeError(f"tensor-parallel {p.name} exited with code {p.exitcode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks did not start within {JOIN_TIMEOUT_SECONDS}s")
            time.sleep(0.05)

    def close(self) -> None:
        """Tell the ranks to stop, wait for them (killing any that hang), leave the group."""
        if not self.procs:
            return
        try:
            stop_workers()
        except RankFailure as err:
            logger.warning("tensor-parallel ranks could not be told to stop: %s", err)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode not in (0, None):
                logger.warning("tensor-parallel %s exited with code %s", p.name, p.exitcode)
        self._kill()
        destroy_distributed()
        torch.set_num_threads(self._threads)

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        self.procs = []


def _spawned_rank(rank: int, world_size: int, port: int, device: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=MODEL_TIMEOUT)
    store.set(f"loom/joined/loom-tp-rank-{rank}", "1")
    config = DistributedConfig(rank, world_size, "127.0.0.1", port, rank, world_size)
    init_distributed(config, rank_device(device, rank), store)
    try:
        run_worker(rank_device(device, rank))
    finally:
        destroy_distributed()
