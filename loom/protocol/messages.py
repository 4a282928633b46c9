"""Router ↔ engine messages: typed msgspec structs, msgpack on the wire (no pickle).

router → engine: `Hello` (on connect), `AddRequest`, `AbortRequests`, `HealthCheck`
engine → router: `EngineReady` (the answer to `Hello`), `StepOutputs` (one frame per engine step with every
request's new tokens), `QueueState` (after aborts), `RequestFailed`, `HealthReport`
"""

from __future__ import annotations

from typing import Union

import msgspec

from loom.protocol.multimodal import ImageInput
from loom.protocol.outputs import FailureKind, RequestOutput
from loom.sampling_params import SamplingParams


def endpoint_paths(endpoint: str) -> tuple[str, str]:
    """`endpoint` is an ipc:// (or tcp://host:port) base; returns the (to-engine, from-engine) addresses."""
    if endpoint.startswith("ipc://"):
        return f"{endpoint}-in", f"{endpoint}-out"
    host, port = endpoint.rsplit(":", 1)
    return endpoint, f"{host}:{int(port) + 1}"


class Hello(msgspec.Struct, tag=True, frozen=True):
    """Sent by a router when it connects; the engine answers with EngineReady."""


class AddRequest(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_logprobs: bool = False  # return the logprob of every prompt token (TGI's decoder_input_details)
    trace_carrier: dict[str, str] | None = None  # W3C headers of the router's request span (tracing on)
    images: list[ImageInput] = []  # the prompt's images, preprocessed by the router (vision-language models)


class AbortRequests(msgspec.Struct, tag=True, frozen=True):
    request_ids: list[str]


class HealthCheck(msgspec.Struct, tag=True, frozen=True):
    nonce: int


class EngineReady(msgspec.Struct, tag=True, frozen=True):
    architecture: str
    dtype: str
    max_total_tokens: int  # longest request the engine accepts (prompt + generated)
    max_batch_total_tokens: int  # KV cache capacity in tokens
    max_batch_prefill_tokens: int
    max_batch_size: int
    block_size: int
    vocab_size: int
    speculate: int = 0  # most draft tokens per request and step (0: no speculative decoding)


class KVBlocks(msgspec.Struct, frozen=True):
    """The KV cache's blocks: held by requests, cached (held by none, revivable by a prefix hit), free; and, on an
    idle engine, the outcome of its integrity check (free + cached + used = total, every reference held by a block
    table, no block twice in one table): "" passed, else the problem; None when not checked (a busy engine)."""

    total: int
    used: int
    cached: int
    integrity: str | None = None


class StepStats(msgspec.Struct, frozen=True):
    num_running: int
    num_waiting: int
    num_prefill_tokens: int  # prompt tokens computed this step
    num_decode_tokens: int
    forward_seconds: float  # model forward
    step_seconds: float  # whole step incl. scheduling and sampling
    num_draft_tokens: int = 0  # speculation: draft tokens verified this step
    num_accepted_tokens: int = 0  # of those, accepted
    kv: KVBlocks | None = None  # after the step
    num_preemptions: int = 0  # requests preempted this step (their KV freed; recomputed when re-admitted)


class StepOutputs(msgspec.Struct, tag=True, frozen=True):
    outputs: list[RequestOutput]
    stats: StepStats


class QueueState(msgspec.Struct, tag=True, frozen=True):
    """The engine's queue after something other than a step changed it (aborted requests), and once more when the
    engine goes idle (with its KV integrity check): the gauges a step frame would carry, so that they are true on
    an idle engine."""

    num_running: int
    num_waiting: int
    kv: KVBlocks | None = None


class RequestFailed(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    error_type: FailureKind
    message: str


class HealthReport(msgspec.Struct, tag=True, frozen=True):
    nonce: int
    ok: bool
    message: str = ""


ToEngine = Union[Hello, AddRequest, AbortRequests, HealthCheck]
FromEngine = Union[EngineReady, StepOutputs, QueueState, RequestFailed, HealthReport]

_encoder = msgspec.msgpack.Encoder()
to_engine_decoder = msgspec.msgpack.Decoder(ToEngine)
from_engine_decoder = msgspec.msgpack.Decoder(FromEngine)


def encode(msg: ToEngine | FromEngine) -> bytes:
    return _encoder.encode(msg)
