"""The router's side of the engine connection: submit, abort, health, and one receive loop that fans each
step's frame out to the per-request streams. This client is the only owner of the stream table."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
import zmq.utils.monitor

from loom.protocol.outputs import FailureKind, RequestOutput
from loom.protocol.multimodal import ImageInput
from loom.protocol.messages import (
    AbortRequests,
    AddRequest,
    EngineReady,
    HealthCheck,
    HealthReport,
    Hello,
    RequestFailed,
    QueueState,
    StepOutputs,
    StepStats,
    encode,
    endpoint_paths,
    from_engine_decoder,
)
from loom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineError(Exception):
    def __init__(self, error_type: FailureKind, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass
class RequestStream:
    """Outputs of one request, in order. Iterate with `async for`; ends after the finishing output."""

    request_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            item = await self.queue.get()
            if isinstance(item, RequestFailed):
                self.finished = True
                raise EngineError(item.error_type, item.message)
            yield item
            if item.finished:
                self.finished = True
                return


class EngineClient:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.ready: EngineReady | None = None
        self.last_stats: StepStats | None = None
        self.on_step: Callable[[StepOutputs], None] | None = None  # metrics hook
        self.on_queue_state: Callable[[QueueState], None] | None = None  # metrics hook (gauges after aborts)
        self._streams: dict[str, RequestStream] = {}
        self._health: dict[int, asyncio.Future] = {}
        self._nonce = itertools.count()
        self._ctx = zmq.asyncio.Context()
        self._recv_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.engine_lost: str | None = None  # set once the engine's socket closed: every request now fails

    async def connect(self, timeout: float | None = None) -> EngineReady:
        to_addr, from_addr = endpoint_paths(self.endpoint)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(to_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.connect(from_addr)
        self._push.send(encode(Hello()))
        while True:
            msg = from_engine_decoder.decode(await asyncio.wait_for(self._pull.recv(), timeout))
            if isinstance(msg, EngineReady):
                self.ready = msg
                break
        self._recv_task = asyncio.create_task(self._receive_loop(), name="engine-receive")
        self._monitor = self._pull.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._watch_task = asyncio.create_task(self._watch_engine(), name="engine-watch")
        return msg

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def submit(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt_logprobs: bool = False,
        trace_carrier: dict[str, str] | None = None, images: list[ImageInput] | None = None,
    ) -> RequestStream:
        stream = RequestStream(request_id)
        if self.engine_lost is not None:
            stream.queue.put_nowait(RequestFailed(request_id, FailureKind.GENERATION, self.engine_lost))
            return stream
        self._streams[request_id] = stream
        self._push.send(encode(AddRequest(request_id, prompt_token_ids, params, prompt_logprobs, trace_carrier,
                                           list(images or ()))))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone): the engine frees its KV blocks at its next step boundary."""
        if self._streams.pop(request_id, None) is not None:
            self._push.send(encode(AbortRequests([request_id])))

    def release(self, stream: RequestStream) -> None:
        """Forget a stream; aborts it in the engine unless it already finished."""
        if stream.finished:
            self._streams.pop(stream.request_id, None)
        else:
            self.abort(stream.request_id)

    async def health(self, timeout: float) -> HealthReport:
        if self.engine_lost is not None:
            raise OSError(self.engine_lost)
        nonce = next(self._nonce)
        fut = asyncio.get_running_loop().create_future()
        self._health[nonce] = fut
        self._push.send(encode(HealthCheck(nonce)))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._health.pop(nonce, None)

    async def _receive_loop(self) -> None:
        while True:
            msg = from_engine_decoder.decode(await self._pull.recv())
            if isinstance(msg, StepOutputs):
                self.last_stats = msg.stats
                for out in msg.outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.queue.put_nowait(out)
                        if out.finished:
                            del self._streams[out.request_id]
                if self.on_step is not None:
                    self.on_step(msg)
            elif isinstance(msg, QueueState):
                if self.on_queue_state is not None:
                    self.on_queue_state(msg)
            elif isinstance(msg, RequestFailed):
                stream = self._streams.pop(msg.request_id, None)
                if stream is not None:
                    stream.queue.put_nowait(msg)
            elif isinstance(msg, HealthReport):
                fut = self._health.get(msg.nonce)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    async def _watch_engine(self) -> None:
        """The engine process died (or stopped): fail what is in flight now, with an error the client sees, rather
        than leaving streams open until the launcher takes the router down."""
        while True:
            event = zmq.utils.monitor.parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                break
        self.engine_lost = "the engine process exited"
        logger.error("lost the engine; failing %d in-flight request(s)", len(self._streams))
        for request_id, stream in self._streams.items():
            stream.queue.put_nowait(RequestFailed(request_id, FailureKind.GENERATION, self.engine_lost))
        self._streams.clear()
        for fut in self._health.values():
            if not fut.done():
                fut.set_exception(OSError(self.engine_lost))

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._recv_task is not None:
            self._recv_task.cancel()
        self._ctx.destroy(linger=0)
