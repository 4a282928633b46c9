"""The scheduler: decides, each step, how many tokens of which requests to compute.

It schedules tokens, not phases: every request has `num_computed_tokens` and `num_tokens`, and one per-step budget
(`max_batch_prefill_tokens`) covers running decodes (one token each), prompt chunks and recomputation after
preemption. Running requests go first in admission order, then waiting requests in arrival order. When the KV
cache runs out of blocks, the most recently admitted running request is preempted: its blocks are freed (full ones
stay findable in the prefix cache) and it goes back to the front of the queue to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loom.config import EngineConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.engine.request import FinishReason, Request, RequestStatus
from loom.grammar.guide import GrammarGuide
from loom.protocol.plan import NewSeq, PromptScores, RunningSeq, StepPlan, StepResult


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    start: int  # num_computed_tokens when scheduled
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The step computes the request's last known position, so its logits pick the next token."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_computed_prompt_tokens: int = 0  # prompt positions actually run through the model (not cache hits)
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: preemption takes from the end
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        # What the runner holds: block-table length of each request whose KV it has (a running request then goes
        # in the plan as a diff), and the requests it should drop at the next plan.
        self._runner_blocks: dict[str, int] = {}
        self._runner_drops: list[str] = []

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks at once."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._finish(request, FinishReason.ABORTED)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_batch_prefill_tokens
        out = SchedulerOutput([])
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._admit_waiting(out, budget)
        self.stats.num_steps += 1
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request.request_id, request.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    return budget
            out.seqs.append(ScheduledSeq(request, request.num_computed_tokens, n))
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            request = self.waiting[0]
            hits = [] if request.wants_prompt_logprobs else self.kv.find_cached_prefix(request.token_ids)
            computed = len(hits) * self.kv.block_size
            n = min(request.num_tokens - computed, budget)
            if not self.kv.allocate(request.request_id, computed + n, hits):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = computed
            request.num_cached_tokens = min(computed, request.num_prompt_tokens)
            self.stats.num_prefix_hit_tokens += request.num_cached_tokens
            self.running.append(request)
            out.seqs.append(ScheduledSeq(request, computed, n))
            budget -= n

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        self._runner_blocks.pop(request.request_id, None)  # its KV is gone: re-admitted in full
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, scheduled: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance the scheduled requests past this step with what it produced (new tokens, prompt scores).
        Returns the requests that finished this step (their blocks are already free)."""
        finished = []
        tokens = dict(zip(result.request_ids, result.token_ids))
        for seq in scheduled.seqs:
            request = seq.request
            prompt_part = max(0, min(seq.start + seq.num_new_tokens, request.num_prompt_tokens) - seq.start)
            self.stats.num_computed_prompt_tokens += prompt_part
            request.num_computed_tokens = seq.start + seq.num_new_tokens
            scores = result.prompt_scores.get(request.request_id)
            if scores is not None:
                self._record_prompt_scores(request, scores)
            token = tokens.get(request.request_id)
            if token is not None:
                request.token_ids.append(token)
                if request.grammar is not None:
                    GrammarGuide.advance(request.grammar, token)
            self.kv.index_full_blocks(request.request_id, request.token_ids, request.num_computed_tokens)
            if token is not None:
                reason = self._stop_reason(request, token)
                if reason is not None:
                    self._finish(request, reason)
                    finished.append(request)
        return finished

    @staticmethod
    def _record_prompt_scores(request: Request, scores: PromptScores) -> None:
        """Positions scored before a preemption are not recorded again."""
        assert request.prompt_logprobs is not None
        have = len(request.prompt_logprobs)  # positions 0..have-1 recorded (position 0 has no score)
        skip = have - scores.first
        if skip < 0:
            raise AssertionError(f"prompt scores from position {scores.first} leave a gap after {have}")
        request.prompt_logprobs.extend(scores.logprobs[skip:])

    @staticmethod
    def _stop_reason(request: Request, token: int) -> FinishReason | None:
        """The token-level stops, TGI's priority: length, then EOS. Stop sequences are text: matched where the
        text is made (router, loom.LLM: tokenizer.StopSequences), which then aborts the request."""
        if request.num_output_tokens >= request.max_new_tokens:
            return FinishReason.LENGTH
        if not request.params.ignore_eos and token in request.eos_token_ids:
            return FinishReason.EOS_TOKEN
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        self.kv.free(request.request_id)
        self._runner_blocks.pop(request.request_id, None)
        self._runner_drops.append(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def make_plan(self, scheduled: SchedulerOutput) -> StepPlan:
        """The runner's view of the step: requests it does not hold in full, the others as what changed (their
        tokens this step, blocks added to their tables); plain ids, no engine objects."""
        new, running = [], []
        for s in scheduled.seqs:
            r = s.request
            rid = r.request_id
            known = self._runner_blocks.get(rid)
            if known is None:
                table = self.kv.block_ids(rid)
                new.append(NewSeq(rid, list(r.token_ids), r.num_prompt_tokens, s.start, s.num_new_tokens, table,
                                  r.params, r.wants_prompt_logprobs))
                self._runner_blocks[rid] = len(table)
            else:
                added = self.kv.block_ids(rid, known)
                running.append(RunningSeq(rid, r.token_ids[s.start : s.start + s.num_new_tokens], added))
                self._runner_blocks[rid] = known + len(added)
        drops, self._runner_drops = self._runner_drops, []
        return StepPlan(new, running, drops, self.kv.block_size)
