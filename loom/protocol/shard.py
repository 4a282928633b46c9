"""Rank 0 → ranks 1..N-1 messages (the tensor-parallel control channel): msgpack, with the kind in the header.

    LoadModel   build a ModelRunner on this model with this KV cache (replaces the previous one)
    StepPlan    run one forward pass of the plan, taking part in the collectives
    Shutdown    leave the group and exit
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import msgspec

from loom.protocol.plan import StepPlan


class Kind(IntEnum):
    LOAD_MODEL = 1
    STEP = 2
    SHUTDOWN = 3


@dataclass(frozen=True)
class LoadModel:
    model_dir: str  # rank 0's path; a rank on another host may be started with its own copy's path instead
    dtype: str  # resolved on rank 0 ("float32", ...), so every rank builds the same weights
    architecture: str  # checked against the rank's own config.json
    num_blocks: int
    block_size: int
    quantize: str | None = None  # --quantize, so every rank quantizes its shard the same way
    rope: tuple[str, float] | None = None  # --rope-scaling / --rope-factor, so every rank rotates the same way
    kv_cache_dtype: str | None = None  # torch dtype name of the KV cache when not the model's (fp8)


@dataclass(frozen=True)
class Shutdown:
    pass


Message = LoadModel | StepPlan | Shutdown
_TYPES: dict[Kind, type] = {Kind.LOAD_MODEL: LoadModel, Kind.STEP: StepPlan, Kind.SHUTDOWN: Shutdown}
_KINDS = {t: k for k, t in _TYPES.items()}


def encode(msg: Message) -> tuple[int, bytes]:
    return int(_KINDS[type(msg)]), msgspec.msgpack.encode(msg)


def decode(kind: int, payload: bytes) -> Message:
    try:
        return msgspec.msgpack.decode(payload, type=_TYPES[Kind(kind)])
    except (ValueError, msgspec.DecodeError) as err:
        raise ValueError(f"malformed tensor-parallel control message (kind {kind}): {err}") from err
