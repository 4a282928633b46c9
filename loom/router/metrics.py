"""Prometheus metrics with TGI's names, labels and bucket layout (router/src/server.rs, backends/v3)."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from loom.protocol.messages import KVBlocks, QueueState, StepOutputs


disable_created_metrics()  # TGI exposes no `_created` series


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text with TGI's names: counters without prometheus_client's `_total` suffix (TGI's exporter
    writes `tgi_request_count 3`, and dashboards query that name)."""
    text = generate_latest(registry).decode()
    counters = [f.name for f in registry.collect() if f.type == "counter"]
    for name in counters:
        text = re.sub(rf"^(# (?:HELP|TYPE) )?{re.escape(name)}_total(?=[{{ ])", rf"\g<1>{name}", text,
                      flags=re.MULTILINE)
    return text.encode()


def _duration_buckets() -> list[float]:
    # TGI: 35 geometric buckets starting at 0.0001 × 1.5, factor 1.5
    return [0.0001 * 1.5 ** (i + 1) for i in range(35)]


def _linear(top: int, steps: int = 100) -> list[float]:
    top = max(top, steps)
    return [top * (i + 1) / steps for i in range(steps)]


class Metrics:
    def __init__(self, max_input_tokens: int, max_total_tokens: int, max_batch_total_tokens: int,
                 speculate: int = 0):
        r = self.registry = CollectorRegistry()
        d = _duration_buckets()
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests that completed", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Requests that failed", ["err"], registry=r)
        self.request_duration = Histogram("tgi_request_duration", "Total request time", buckets=d, registry=r)
        self.validation_duration = Histogram(
            "tgi_request_validation_duration", "Validation time", buckets=d, registry=r)
        self.queue_duration = Histogram("tgi_request_queue_duration", "Time queued", buckets=d, registry=r)
        self.inference_duration = Histogram(
            "tgi_request_inference_duration", "Inference time", buckets=d, registry=r)
        self.time_per_token = Histogram(
            "tgi_request_mean_time_per_token_duration", "Mean time per generated token", buckets=d, registry=r)
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens per request", buckets=_linear(max_total_tokens),
            registry=r)
        self.input_length = Histogram(
            "tgi_request_input_length", "Input tokens per request", buckets=_linear(max_input_tokens), registry=r)
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "max_new_tokens per request", buckets=_linear(max_total_tokens),
            registry=r)
        self.batch_inference_count = Counter(
            "tgi_batch_inference_count", "Engine steps", ["method"], registry=r)
        self.batch_inference_success = Counter(
            "tgi_batch_inference_success", "Engine steps that succeeded", ["method"], registry=r)
        self.batch_forward_duration = Histogram(
            "tgi_batch_forward_duration", "Model forward pass of an engine step", ["method"], buckets=d, registry=r)
        self.batch_inference_duration = Histogram(
            "tgi_batch_inference_duration", "Whole engine step: scheduling, forward, sampling", ["method"],
            buckets=d, registry=r)
        self.batch_current_size = Gauge("tgi_batch_current_size", "Running requests", registry=r)
        self.batch_max_total_tokens = Gauge(
            "tgi_batch_max_total_tokens", "KV cache capacity in tokens", registry=r)
        self.queue_size = Gauge("tgi_queue_size", "Waiting requests", registry=r)
        self.batch_max_total_tokens.set(max_batch_total_tokens)
        # TGI: tokens a request got from one forward beyond the first (accepted speculative tokens), per step
        self.skipped_tokens = Histogram(
            "tgi_request_skipped_tokens", "Speculative tokens accepted per request and step",
            buckets=[float(i) for i in range(speculate + 1)], registry=r)
        self.spec_draft_tokens = Counter(
            "loom_spec_decode_draft_tokens", "Speculative draft tokens verified", registry=r)
        self.spec_accepted_tokens = Counter(
            "loom_spec_decode_accepted_tokens", "Speculative draft tokens accepted", registry=r)
        self.spec_acceptance_rate = Gauge(
            "loom_spec_decode_acceptance_rate", "Accepted / verified draft tokens since start", registry=r)
        self._drafted = self._accepted = 0
        # Debug: the engine's KV blocks after each step, and the integrity check it runs each time it goes idle
        self.kv_blocks = Gauge("loom_kv_cache_blocks", "KV cache blocks by state: used (held by requests), cached "
                               "(held by none, revivable by a prefix hit), free", ["state"], registry=r)
        self.kv_integrity_checks = Counter(
            "loom_kv_cache_integrity_checks", "Integrity checks of the idle engine's KV cache (free + cached + used "
            "= total, every reference held by a block table, no block twice in a table)", ["result"], registry=r)
        self.kv_integrity_ok = Gauge(
            "loom_kv_cache_integrity_ok", "1 if the latest idle KV integrity check passed, 0 if it failed "
            "(1 before the first)", registry=r)
        self.kv_integrity_ok.set(1)
        self.preemptions = Counter(
            "loom_request_preemptions", "Requests preempted for KV space (freed, recomputed when re-admitted)",
            registry=r)

    def _observe_kv(self, kv: KVBlocks | None) -> None:
        if kv is None:
            return
        self.kv_blocks.labels("used").set(kv.used)
        self.kv_blocks.labels("cached").set(kv.cached)
        self.kv_blocks.labels("free").set(kv.total - kv.used - kv.cached)
        if kv.integrity is not None:
            self.kv_integrity_checks.labels("passed" if kv.integrity == "" else "failed").inc()
            self.kv_integrity_ok.set(kv.integrity == "")

    def observe_queue_state(self, state: QueueState) -> None:
        """The engine's queue after aborts (no step frame may follow them) and when it goes idle."""
        self.batch_current_size.set(state.num_running)
        self.queue_size.set(state.num_waiting)
        self._observe_kv(state.kv)

    def observe_step(self, step: StepOutputs) -> None:
        """Called by the engine client for every step frame. A step with prompt tokens counts as a prefill."""
        s = step.stats
        method = "prefill" if s.num_prefill_tokens else "decode"
        self.batch_inference_count.labels(method).inc()
        self.batch_inference_success.labels(method).inc()
        self.batch_forward_duration.labels(method).observe(s.forward_seconds)
        self.batch_inference_duration.labels(method).observe(s.step_seconds)
        self.batch_current_size.set(s.num_running)
        self.queue_size.set(s.num_waiting)
        self._observe_kv(s.kv)
        if s.num_preemptions:
            self.preemptions.inc(s.num_preemptions)
        for out in step.outputs:
            if out.new_token_ids:
                self.skipped_tokens.observe(len(out.new_token_ids) - 1)
        if s.num_draft_tokens:
            self.spec_draft_tokens.inc(s.num_draft_tokens)
            self.spec_accepted_tokens.inc(s.num_accepted_tokens)
            self._drafted += s.num_draft_tokens
            self._accepted += s.num_accepted_tokens
            self.spec_acceptance_rate.set(self._accepted / self._drafted)
