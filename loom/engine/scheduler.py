"""The scheduler: decides, each step, how many tokens of which requests to compute.

It schedules tokens, not phases: every request has `num_computed_tokens` and `num_tokens`, and one per-step budget
(`max_batch_prefill_tokens`) covers running decodes (one token each), prompt chunks and recomputation after
preemption. Running requests go first in admission order, then waiting requests in arrival order. When the KV
cache runs out of blocks, the most recently admitted running request is preempted: its blocks are freed (full ones
stay findable in the prefix cache) and it goes back to the front of the queue to be recomputed later.

With speculation (`Speculator`), the budget left after that goes to draft tokens for running decodes, as many as
the speculator's cost model finds worth verifying and the KV cache holds without preempting anyone; a draft's
position is computed in the step, and counts as computed only once accepted.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from loom.config import EngineConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.engine.request import FinishReason, Request, RequestStatus
from loom.engine.speculation import DraftCandidate, Speculator
from loom.grammar.guide import GrammarGuide
from loom.protocol.multimodal import block_extras, whole_prompt_extras
from loom.protocol.outputs import failure_message
from loom.protocol.plan import NewSeq, PromptScores, RunningSeq, StepPlan, StepResult

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    start: int  # num_computed_tokens when scheduled
    num_new_tokens: int  # positions computed this step, drafts included
    draft_ids: list[int] = field(default_factory=list)  # proposed tokens after the last known one
    draft_order: int = 0  # the n of the n-gram that proposed them

    @property
    def samples(self) -> bool:
        """The step computes the request's last known position, so its logits pick the next token."""
        return self.start + self.num_new_tokens - len(self.draft_ids) == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    preempted: list[Request] = field(default_factory=list)
    propose_drafts: bool = False  # the runner's speculator heads / draft model propose drafts after this step

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
    def __init__(self, config: EngineConfig, kv: KVCacheManager, speculator: Speculator | None = None):
        self.config = config
        self.kv = kv
        self.speculator = speculator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: preemption takes from the end
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        # What the runner holds: block-table length of each request whose KV it has (a running request then goes
        # in the plan as a diff), and the requests it should drop at the next plan.
        self._runner_blocks: dict[str, int] = {}
        self._runner_drops: list[str] = []
        # the model's image tokens attend to each other both ways (Gemma 3): no prompt chunk ends inside an image
        self.whole_images = False
        # the model's prompt tokens attend to each other both ways (PaliGemma): a prompt is computed in one step,
        # and its blocks are cached under the whole prompt (a block's K/V depend on the tokens after it)
        self.whole_prompts = False
        self._encoded = 0  # image embeddings whose vision tower runs in the step being scheduled

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        num_blocks = self.kv.blocks_needed(request.num_prompt_tokens)
        if self.whole_prompts:
            request.block_extras = whole_prompt_extras(request.token_ids, request.images, num_blocks)
        elif request.images:
            request.block_extras = block_extras(request.images, self.kv.block_size, num_blocks)
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
        self._encoded = 0
        out = SchedulerOutput([])
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            budget = self._admit_waiting(out, budget)
        if self.speculator is not None and budget > 0 and not out.preempted:
            self._add_drafts(out, self.speculator)
        if self.speculator is not None and self.speculator.drafts_from_model:
            # drafts from the model cost model time: made only when a step like this one would verify some
            sampling = [s.request.request_id for s in out.seqs if s.samples]
            out.propose_drafts = self.speculator.worth_proposing(
                sampling, out.num_tokens - sum(len(s.draft_ids) for s in out.seqs), len(sampling),
                self.config.max_batch_prefill_tokens)
        self.stats.num_steps += 1
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, request.num_computed_tokens, budget)
            if n == 0:  # its next image waits for the next step's encoder budget
                i += 1
                continue
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

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            request = self.waiting[0]
            hits = [] if request.wants_prompt_logprobs else self.kv.find_cached_prefix(
                request.token_ids, request.params.adapter_id, request.block_extras)
            computed = len(hits) * self.kv.block_size
            n = self._chunk(request, computed, budget)
            if n == 0 or not self.kv.allocate(request.request_id, computed + n, hits):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = computed
            request.num_cached_tokens = min(computed, request.num_prompt_tokens)
            self.stats.num_prefix_hit_tokens += request.num_cached_tokens
            self.running.append(request)
            out.seqs.append(ScheduledSeq(request, computed, n))
            budget -= n
        return budget

    def _chunk(self, request: Request, start: int, budget: int) -> int:
        """Positions of `request` to compute from `start` within `budget` (0: none this step).

        The vision tower of an image runs in the step that computes the image's first token, and everything else
        in that step waits for it: the images a step starts share an encoder budget of `max_batch_prefill_tokens`
        embeddings (vLLM's default). A chunk that would start an image past it ends before the image, unless no
        image was started yet this step (one always goes, whatever its size).

        For a model whose image tokens attend to each other both ways (`whole_images`), a prompt chunk never ends
        inside an image: it ends before the image, or, when the image starts the chunk, takes the whole image even
        past the budget. For a model whose prompt does (`whole_prompts`), a chunk never ends inside the prompt: it
        takes the rest of the prompt even past the budget (or waits, when its images do not fit the encoder budget
        left)."""
        n = min(request.num_tokens - start, budget)
        end = start + n
        if self.whole_prompts and end < request.num_prompt_tokens:
            end = request.num_prompt_tokens
        starting = [im for im in request.images if start <= im.offset < end]  # images this chunk starts
        limit, before = self.config.max_batch_prefill_tokens, self._encoded
        for image in starting:
            # the first image of a step always goes; so do all of a whole prompt's when it is the step's first
            first = self._encoded == 0 or (self.whole_prompts and before == 0)
            if not first and self._encoded + image.num_embeds > limit:
                if self.whole_prompts:  # none of its images this step: the prompt waits
                    self._encoded = before
                    return 0
                end = image.offset
                break
            self._encoded += image.num_embeds
        if self.whole_images:
            for image in request.images:
                if image.offset < end < image.end:
                    end = image.offset if image.offset > start else image.end
                    break
        return end - start

    def _add_drafts(self, out: SchedulerOutput, speculator: Speculator) -> None:
        """Drafts for the step's decodes of requests the runner holds (a re-admitted request runs without), cut at
        what the request may still generate, what its grammar accepts and its first EOS, then trimmed by the
        speculator's cost model; a request whose drafts the KV cache cannot hold runs without them."""
        decodes: list[tuple[ScheduledSeq, DraftCandidate]] = []
        for seq in out.seqs:
            r = seq.request
            if seq.num_new_tokens != 1 or not seq.samples or r.request_id not in self._runner_blocks:
                continue
            # accepting j drafts yields j + 1 tokens: no more than the request may still generate
            candidate = speculator.propose(r.request_id, r.token_ids, r.max_new_tokens - r.num_output_tokens - 1)
            if candidate is None:
                continue
            drafts = candidate.draft_ids
            if r.grammar is not None:
                del drafts[r.grammar.validate_tokens(drafts):]
            if not r.params.ignore_eos:
                for i, token in enumerate(drafts):
                    if token in r.eos_token_ids:  # nothing follows an accepted EOS
                        del drafts[i + 1:]
                        break
            if drafts:
                decodes.append((seq, candidate))
        if not decodes:
            return
        expected = sum(1 for s in out.seqs if s.samples)
        speculator.plan([c for _, c in decodes], out.num_tokens, expected, self.config.max_batch_prefill_tokens)
        for seq, candidate in decodes:
            n = len(candidate.draft_ids)
            if n and self.kv.allocate(seq.request.request_id, seq.start + 1 + n):
                seq.draft_ids, seq.draft_order = candidate.draft_ids, candidate.order
                seq.num_new_tokens += n

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
        Returns the requests that finished this step (their blocks are already free), among them those that
        failed in it (`error` set): in the runner (`result.failed`) or here. A failure is the request's own: the
        rest of the batch goes on."""
        finished = []
        new_tokens = dict(zip(result.request_ids, result.token_ids))
        if result.draft_ids and self.speculator is not None and self.speculator.drafts_from_model:
            for rid, drafts in result.draft_ids.items():
                self.speculator.receive(rid, drafts)
        for seq in scheduled.seqs:
            request = seq.request
            why = result.failed.get(request.request_id)
            if why is None:
                try:
                    reason = self._advance(seq, result, new_tokens.get(request.request_id, ()))
                except Exception as err:
                    logger.exception("request %s failed while advancing past its step", request.request_id)
                    why = failure_message(err)
                else:
                    if reason is not None:
                        self._finish(request, reason)
                        finished.append(request)
                    continue
            self._finish(request, FinishReason.ABORTED)
            request.error = why
            finished.append(request)
        return finished

    def _advance(self, seq: ScheduledSeq, result: StepResult, tokens: Sequence[int]) -> FinishReason | None:
        """One request past its step: computed positions, prompt scores, new tokens up to a stop; why it stops."""
        request = seq.request
        known_end = seq.start + seq.num_new_tokens - len(seq.draft_ids)  # positions of known tokens computed
        prompt_part = max(0, min(known_end, request.num_prompt_tokens) - seq.start)
        self.stats.num_computed_prompt_tokens += prompt_part
        scores = result.prompt_scores.get(request.request_id)
        if scores is not None:
            self._record_prompt_scores(request, scores)
        if seq.draft_ids:
            # tokens = the accepted drafts, then the runner's own choice after them
            assert self.speculator is not None
            self.speculator.record(request.request_id, seq.draft_order, len(seq.draft_ids), len(tokens) - 1)
            known_end += len(tokens) - 1
        reason = None
        for token in tokens:  # TGI: the stopping criteria run per token; tokens after a stop are dropped
            request.token_ids.append(token)
            if request.grammar is not None:
                GrammarGuide.advance(request.grammar, token)
            reason = self._stop_reason(request, token)
            if reason is not None:
                break
        # an accepted draft's position is computed; after a stop inside the accepted ones, those past it are not
        request.num_computed_tokens = min(known_end, request.num_tokens - 1) if tokens else known_end
        self.kv.index_full_blocks(request.request_id, request.token_ids, request.num_computed_tokens,
                                  request.params.adapter_id, request.block_extras)
        return reason

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
        if self.speculator is not None:
            self.speculator.drop(request.request_id)
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
                                  r.params, r.wants_prompt_logprobs, r.images))
                self._runner_blocks[rid] = len(table)
            else:
                added = self.kv.block_ids(rid, known)
                known_tokens = r.token_ids[s.start : s.start + s.num_new_tokens - len(s.draft_ids)]
                running.append(RunningSeq(rid, s.start, known_tokens + s.draft_ids, added, len(s.draft_ids)))
                self._runner_blocks[rid] = known + len(added)
        drops, self._runner_drops = self._runner_drops, []
        return StepPlan(new, running, drops, self.kv.block_size, scheduled.propose_drafts)
