"""The engine process: EngineCore behind two ZMQ sockets, driven by one loop.

    router ──PUSH──▶ {endpoint}-in   (AddRequest, AbortRequests, HealthCheck)
    router ◀──PULL── {endpoint}-out  (EngineReady once, then one StepOutputs frame per step, RequestFailed, HealthReport)

The loop drains incoming messages (without waiting while there is work), runs one step, and sends all requests'
new tokens in one frame. A request whose own part of a step raises (its grammar, its sampling) fails alone and the
batch goes on. A failure of the step itself (the forward pass) fails the requests of that step, frees their blocks
and marks the engine unhealthy until a health probe succeeds; the process keeps serving. The exception is a tensor-parallel
failure (a rank died, or the ranks fell out of step): the process exits, and the launcher takes the server down.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field

import zmq

from loom import tracing
from loom.distributed.comm import RankFailure
from loom.engine.core import EngineCore
from loom.protocol.messages import (
    AbortRequests,
    AddRequest,
    EngineReady,
    HealthCheck,
    HealthReport,
    Hello,
    KVBlocks,
    QueueState,
    RequestFailed,
    StepOutputs,
    StepStats,
    encode,
    endpoint_paths,
    to_engine_decoder,
)
from loom.protocol.outputs import FailureKind
from loom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 100


@dataclass
class EngineServer:
    engine: EngineCore
    endpoint: str
    healthy: bool = True
    _stop: bool = False
    _busy: bool = False  # a step ran since the engine was last idle
    _spans: dict = field(default_factory=dict)  # request id → its engine-side trace span (tracing on only)

    def run(self) -> None:
        ctx = zmq.Context.instance()
        in_addr, out_addr = endpoint_paths(self.endpoint)
        self._in = ctx.socket(zmq.PULL)
        self._in.bind(in_addr)
        self._out = ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 1000)
        self._out.bind(out_addr)
        logger.info("engine serving on %s", self.endpoint)
        try:
            while not self._stop:
                self._drain(wait_ms=0 if self.engine.has_unfinished() else IDLE_POLL_MS)
                if self.engine.has_unfinished():
                    self._step()
                elif self._busy:  # just went idle (the last request finished, failed or was aborted)
                    self._busy = False
                    self._send(self._idle_state())
        finally:
            self._in.close(linger=0)
            self._out.close()

    def stop(self, *_: object) -> None:
        self._stop = True

    def _ready_message(self) -> EngineReady:
        e = self.engine
        return EngineReady(
            e.model_config.architecture, str(e.model_config.dtype).removeprefix("torch."), e.max_total_tokens,
            e.kv.pool.num_blocks * e.config.block_size, e.config.max_batch_prefill_tokens, e.config.max_batch_size,
            e.config.block_size, e.model_config.vocab_size, e.config.speculate,
        )

    def _send(self, msg: object) -> None:
        self._out.send(encode(msg))  # type: ignore[arg-type]

    def _drain(self, wait_ms: int) -> None:
        if not self._in.poll(wait_ms):
            return
        while True:
            try:
                raw = self._in.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(to_engine_decoder.decode(raw))

    def _handle(self, msg: Hello | AddRequest | AbortRequests | HealthCheck) -> None:
        if isinstance(msg, Hello):
            self._send(self._ready_message())
        elif isinstance(msg, AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.prompt_logprobs,
                                        msg.images)
            except ValueError as err:
                self._send(RequestFailed(msg.request_id, FailureKind.VALIDATION, str(err)))
                return
            if tracing.enabled():
                self._spans[msg.request_id] = tracing.start_span(
                    "engine_request", msg.trace_carrier,
                    attributes={"request_id": msg.request_id, "input_length": len(msg.prompt_token_ids)})
        elif isinstance(msg, AbortRequests):
            aborted = [rid for rid in msg.request_ids if self.engine.abort_request(rid)]
            for rid in msg.request_ids:
                tracing.end_span(self._spans.pop(rid, None), error="aborted")
            if aborted:  # no step may follow (the engine may now be idle): the gauges must still be true
                sched = self.engine.scheduler
                self._send(QueueState(len(sched.running), len(sched.waiting), self._kv_blocks()))
        elif isinstance(msg, HealthCheck):
            self._send(self._health(msg.nonce))

    def _kv_blocks(self, integrity: str | None = None) -> KVBlocks:
        pool = self.engine.kv.pool
        return KVBlocks(pool.num_blocks, pool.num_used, pool.num_cached_unused, integrity)

    def _idle_state(self) -> QueueState:
        """The queue (empty) and the KV cache of an engine that just went idle, with the integrity check that only
        an idle engine can run: every block free or cached, the pool's bookkeeping consistent."""
        try:
            self.engine.check_integrity()
            problem = ""
        except AssertionError as err:
            problem = str(err) or "failed"
            logger.error("KV cache integrity check failed on the idle engine: %s", problem)
        sched = self.engine.scheduler
        return QueueState(len(sched.running), len(sched.waiting), self._kv_blocks(problem))

    def _step(self) -> None:
        self._busy = True
        sched = self.engine.scheduler
        start = time.perf_counter()
        computed_before = sched.stats.num_computed_prompt_tokens
        preempted_before = sched.stats.num_preemptions
        spec = self.engine.speculator.stats if self.engine.speculator is not None else None
        drafted_before, accepted_before = (spec.num_draft_tokens, spec.num_accepted_tokens) if spec else (0, 0)
        try:
            outputs = self.engine.step()
        except RankFailure:
            logger.critical("tensor-parallel failure: stopping the engine")
            raise
        except Exception as err:
            logger.exception("engine step failed")
            self._fail_running(f"Server error: {err}")
            return
        elapsed = time.perf_counter() - start
        failed = [o for o in outputs if o.error is not None]
        if failed:  # a request's own failure: it gets a 424, the batch goes on
            outputs = [o for o in outputs if o.error is None]
            for out in failed:
                self._send(RequestFailed(out.request_id, FailureKind.GENERATION, out.error or ""))
                tracing.end_span(self._spans.pop(out.request_id, None), error=out.error)
        prefill = sched.stats.num_computed_prompt_tokens - computed_before
        drafted, accepted = (spec.num_draft_tokens - drafted_before, spec.num_accepted_tokens - accepted_before) \
            if spec else (0, 0)
        stats = StepStats(len(sched.running), len(sched.waiting), prefill, sum(len(o.new_token_ids) for o in outputs),
                          self.engine.last_forward_seconds, elapsed, drafted, accepted, self._kv_blocks(),
                          sched.stats.num_preemptions - preempted_before)
        self._send(StepOutputs(outputs, stats))
        if self._spans:
            for out in outputs:
                if out.finished and out.request_id in self._spans:
                    tracing.end_span(self._spans.pop(out.request_id), attributes={
                        "finish_reason": out.finish_reason.value if out.finish_reason else "",
                        "cached_tokens": out.num_cached_tokens})

    def _fail_running(self, message: str) -> None:
        self.healthy = False
        sched = self.engine.scheduler
        for request in list(sched.running) + list(sched.waiting):
            self.engine.abort_request(request.request_id)
            self._send(RequestFailed(request.request_id, FailureKind.GENERATION, message))
            tracing.end_span(self._spans.pop(request.request_id, None), error=message)

    def _health(self, nonce: int) -> HealthReport:
        """Healthy engines answer at once; after a failure, a one-token generation must succeed first (TGI's
        liveness prefill). Steps run for the probe also carry other requests' tokens, so they go out as usual."""
        if not self.engine.has_unfinished():
            try:
                self.engine.check_integrity()  # idle: every KV block must be free or cached, none leaked
            except AssertionError as err:
                logger.error("KV cache integrity check failed: %s", err)
                return HealthReport(nonce, False, f"KV cache integrity: {err}")
        if self.healthy:
            return HealthReport(nonce, True)
        probe = f"__health_{nonce}"
        try:
            self.engine.add_request(probe, [0], SamplingParams(max_new_tokens=1))
        except ValueError as err:
            return HealthReport(nonce, False, str(err))
        self.healthy = True  # _step() sets it back to False if the probe's step fails
        while probe in self.engine.scheduler.requests and self.healthy:
            self._step()
        return HealthReport(nonce, self.healthy, "" if self.healthy else "liveness generation failed")


def serve(engine: EngineCore, endpoint: str) -> None:
    server = EngineServer(engine, endpoint)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    server.run()
