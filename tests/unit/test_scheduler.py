"""Scheduler over a real KVCacheManager, driven step by step by a fake runner (no model).

Each step: `schedule()`, then `update(out, sampled(tokens))` where `tokens` holds a made-up token for every scheduled
seq that samples; plans are checked through `RunnerMirror`, which rebuilds what the runner holds from them. Block size 4; exact expectations on chunks, block ids, stats and finish reasons; every scenario ends
with `kv.check_integrity()` and, when idle, every block back in the free queue.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple

import pytest

from loom.config import EngineConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.engine.request import FinishReason, Request, RequestStatus
from loom.engine.scheduler import Scheduler, SchedulerOutput
from loom.protocol.plan import StepPlan, StepResult
from loom.sampling_params import SamplingParams

BS = 4
EOS = 99


def sampled(tokens: dict[str, int]) -> StepResult:
    """A step's result as the runner reports it: one new token per sampling request."""
    return StepResult(list(tokens), [[t] for t in tokens.values()], [[0.0] for _ in tokens], [[[]] for _ in tokens], {}, 0.0)


class RunnerMirror:
    """What the runner rebuilds from the plans (worker/runner.py: `_apply`): each request's block table and
    positions computed. `apply` returns the step's (request id, start, token ids, whole block table)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[list[int], list[int]]] = {}  # id → (block table, [positions computed])

    def apply(self, plan: StepPlan) -> list[tuple[str, int, list[int], list[int]]]:
        for rid in plan.finished:
            self.held.pop(rid, None)
        seqs = []
        for new in plan.new:
            self.held[new.request_id] = (list(new.block_ids), [new.start + new.num_new])
            seqs.append((new.request_id, new.start, new.token_ids[new.start : new.start + new.num_new],
                         list(new.block_ids)))
        for diff in plan.running:
            table, computed = self.held[diff.request_id]
            table.extend(diff.new_block_ids)
            seqs.append((diff.request_id, computed[0], diff.token_ids, list(table)))
            computed[0] += diff.num_new
        return seqs


def make_scheduler(
    num_blocks: int = 64, budget: int = 100, max_batch_size: int = 256, prefix_caching: bool = True
) -> Scheduler:
    config = EngineConfig(
        max_batch_prefill_tokens=budget, max_batch_size=max_batch_size, block_size=BS,
        enable_prefix_caching=prefix_caching,
    )
    return Scheduler(config, KVCacheManager(num_blocks, BS, prefix_caching))


def make_request(
    rid: str, prompt: list[int], max_new_tokens: int = 8, params: SamplingParams | None = None,
) -> Request:
    return Request(
        rid, list(prompt), params or SamplingParams(), max_new_tokens, frozenset({EOS})
    )


def counting_token(request: Request) -> int:
    """Default fake sampler: 500, 501, 502, ... per request (never EOS)."""
    return 500 + request.num_output_tokens


class Step(NamedTuple):
    out: SchedulerOutput
    finished: list[Request]
    summary: list[tuple[str, int, int, bool]]  # (request_id, start, num_new_tokens, samples) per scheduled seq
    tables: dict[str, list[int]]  # block table of each scheduled request while the step ran


def step(sched: Scheduler, token_for: Callable[[Request], int] = counting_token) -> Step:
    """One engine step with a fake runner: schedule, 'run', sample where the schedule says so, update."""
    out = sched.schedule()
    summary = [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.seqs]
    tables = {s.request.request_id: sched.kv.block_ids(s.request.request_id) for s in out.seqs}
    tokens = {s.request.request_id: token_for(s.request) for s in out.seqs if s.samples}
    finished = sched.update(out, sampled(tokens))
    return Step(out, finished, summary, tables)


def assert_idle(sched: Scheduler) -> None:
    assert not sched.has_unfinished() and sched.requests == {}
    assert sched.kv.num_tables() == 0
    assert sched.kv.num_free_blocks == sched.kv.pool.num_blocks
    sched.kv.check_integrity()


def scripted(tokens: dict[str, list[int]]) -> Callable[[Request], int]:
    return lambda r: tokens[r.request_id][r.num_output_tokens]


# ---------------------------------------------------------------- budget, chunking, batch size


def test_chunked_prefill_only_samples_on_the_last_chunk():
    sched = make_scheduler(budget=10)
    a = make_request("a", list(range(25)), max_new_tokens=3)
    sched.add(a)
    steps = [step(sched).summary for _ in range(5)]
    assert steps == [
        [("a", 0, 10, False)],
        [("a", 10, 10, False)],
        [("a", 20, 5, True)],
        [("a", 25, 1, True)],
        [("a", 26, 1, True)],
    ]
    assert a.output_token_ids == [500, 501, 502]
    assert a.finish_reason is FinishReason.LENGTH and a.is_finished
    assert sched.stats.num_steps == 5 and sched.stats.num_computed_prompt_tokens == 25
    assert sched.stats.num_prefix_hit_tokens == 0
    assert_idle(sched)


def test_chunk_table_grows_with_each_chunk():
    sched = make_scheduler(budget=10)
    a = make_request("a", list(range(25)), max_new_tokens=1)
    sched.add(a)
    out = sched.schedule()
    sched.update(out, sampled({}))
    assert sched.kv.block_ids("a") == [0, 1, 2]  # positions 0..9
    assert a.num_computed_tokens == 10 and a.status is RequestStatus.RUNNING
    assert sched.kv.pool.num_cached == 2
    assert out.num_tokens == 10
    sched.update(sched.schedule(), sampled({}))
    assert sched.kv.block_ids("a") == [0, 1, 2, 3, 4]  # positions 0..19
    assert sched.kv.pool.num_cached == 5
    sched.kv.check_integrity()


def test_budget_covers_decodes_first_then_prefill_chunks_in_arrival_order():
    sched = make_scheduler(budget=10)
    sched.add(make_request("a", list(range(100, 106)), max_new_tokens=2))
    sched.add(make_request("b", list(range(200, 207)), max_new_tokens=2))
    sched.add(make_request("c", list(range(300, 305)), max_new_tokens=2))
    assert step(sched).summary == [("a", 0, 6, True), ("b", 0, 4, False)]
    assert [r.request_id for r in sched.waiting] == ["c"]
    # a decodes (1), b finishes its prompt (3), c gets the remaining 6 and needs 5.
    assert step(sched).summary == [("a", 6, 1, True), ("b", 4, 3, True), ("c", 0, 5, True)]
    _, finished, summary, _ = step(sched)
    assert summary == [("b", 7, 1, True), ("c", 5, 1, True)]  # a finished at 2 tokens last step
    assert [r.request_id for r in finished] == ["b", "c"]
    assert sched.stats.num_computed_prompt_tokens == 18
    assert_idle(sched)


def test_budget_smaller_than_running_decodes():
    sched = make_scheduler(budget=2)
    for rid in "abc":
        sched.add(make_request(rid, [ord(rid)], max_new_tokens=4))
    assert step(sched).summary == [("a", 0, 1, True), ("b", 0, 1, True)]
    # Running requests take the whole budget: c waits although the batch has room.
    assert step(sched).summary == [("a", 1, 1, True), ("b", 1, 1, True)]
    assert [r.request_id for r in sched.waiting] == ["c"]
    sched.kv.check_integrity()


def test_max_batch_size_caps_running_requests():
    sched = make_scheduler(max_batch_size=2)
    a = make_request("a", [1, 2, 3], max_new_tokens=2)
    b = make_request("b", [4, 5, 6], max_new_tokens=3)
    c = make_request("c", [7, 8, 9], max_new_tokens=1)
    for r in (a, b, c):
        sched.add(r)
    assert step(sched).summary == [("a", 0, 3, True), ("b", 0, 3, True)]
    assert len(sched.running) == 2 and c.status is RequestStatus.WAITING and sched.kv.block_ids("c") == []
    _, finished, summary, _ = step(sched)
    assert summary == [("a", 3, 1, True), ("b", 3, 1, True)]  # c still capped: a finishes only in update
    assert finished == [a]
    _, finished, summary, _ = step(sched)
    assert summary == [("b", 4, 1, True), ("c", 0, 3, True)]
    assert finished == [b, c]
    assert_idle(sched)


def test_waiting_queue_is_first_come_first_served_on_block_shortage():
    sched = make_scheduler(num_blocks=4)
    a = make_request("a", list(range(9)), max_new_tokens=1)  # 3 blocks
    b = make_request("b", list(range(10, 19)), max_new_tokens=1)  # 3 blocks: does not fit beside a
    c = make_request("c", [20, 21], max_new_tokens=1)  # 1 block: would fit, but queues behind b
    for r in (a, b, c):
        sched.add(r)
    _, finished, summary, _ = step(sched)
    assert summary == [("a", 0, 9, True)] and finished == [a]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert step(sched).summary == [("b", 0, 9, True), ("c", 0, 2, True)]
    assert_idle(sched)


def test_duplicate_request_id_is_rejected():
    sched = make_scheduler()
    sched.add(make_request("a", [1]))
    with pytest.raises(ValueError, match="duplicate request id 'a'"):
        sched.add(make_request("a", [2]))
    assert len(sched.waiting) == 1


# ---------------------------------------------------------------- prefix cache


def test_prefix_hit_at_admission_skips_whole_blocks():
    sched = make_scheduler()
    a = make_request("a", list(range(10)), max_new_tokens=1)
    sched.add(a)
    assert step(sched).summary == [("a", 0, 10, True)]
    assert a.num_cached_tokens == 0 and a.is_finished
    # a's blocks [0, 1, 2] are free; 0 and 1 are full and stay findable.
    b = make_request("b", list(range(8)) + [70, 71, 72], max_new_tokens=1)
    sched.add(b)
    out = sched.schedule()
    assert [(s.start, s.num_new_tokens, s.samples) for s in out.seqs] == [(8, 3, True)]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert sched.stats.num_prefix_hit_tokens == 8
    assert sched.kv.block_ids("b") == [0, 1, 3]  # never-used blocks are handed out before a's freed tail (2)
    plan = sched.make_plan(out)
    assert plan.running == [] and [(p.start, p.num_new, p.block_ids) for p in plan.new] == [(8, 3, [0, 1, 3])]
    assert plan.new[0].token_ids == b.token_ids and plan.finished == ["a"]  # a finished last step: dropped now
    sched.update(out, sampled({"b": 1}))
    assert sched.stats.num_computed_prompt_tokens == 13
    assert_idle(sched)


def test_prompt_of_whole_blocks_leaves_its_last_block_to_compute():
    sched = make_scheduler()
    sched.add(make_request("a", list(range(12)), max_new_tokens=1))
    step(sched)
    b = make_request("b", list(range(12)), max_new_tokens=1)
    sched.add(b)
    assert step(sched).summary == [("b", 8, 4, True)]  # 2 of the 3 cached blocks: the last token needs its logits
    assert b.num_cached_tokens == 8 and sched.stats.num_prefix_hit_tokens == 8
    assert_idle(sched)


def test_running_requests_share_prefix_blocks():
    sched = make_scheduler(num_blocks=8)
    a = make_request("a", list(range(9)), max_new_tokens=3)
    sched.add(a)
    step(sched)
    b = make_request("b", list(range(8)) + [50], max_new_tokens=3)
    sched.add(b)
    assert step(sched).summary == [("a", 9, 1, True), ("b", 8, 1, True)]
    assert sched.kv.block_ids("a") == [0, 1, 2] and sched.kv.block_ids("b") == [0, 1, 3]
    assert [blk.ref_count for blk in sched.kv.pool.blocks[:4]] == [2, 2, 1, 1]
    sched.kv.check_integrity()
    while sched.has_unfinished():
        step(sched)
    assert_idle(sched)


def test_prefix_caching_disabled_recomputes_everything():
    sched = make_scheduler(prefix_caching=False)
    sched.add(make_request("a", list(range(12)), max_new_tokens=1))
    step(sched)
    b = make_request("b", list(range(12)), max_new_tokens=1)
    sched.add(b)
    assert step(sched).summary == [("b", 0, 12, True)]
    assert b.num_cached_tokens == 0 and sched.stats.num_prefix_hit_tokens == 0
    assert_idle(sched)


# ---------------------------------------------------------------- preemption


def test_preemption_frees_the_latest_admitted_and_requeues_it_first():
    sched = make_scheduler(num_blocks=2)
    a = make_request("a", [1, 2, 3, 4], max_new_tokens=3)  # its first decode needs a second block
    b = make_request("b", [5, 6], max_new_tokens=3)  # has room in its block
    sched.add(a)
    sched.add(b)
    assert step(sched).summary == [("a", 0, 4, True), ("b", 0, 2, True)]
    assert sched.kv.block_ids("a") == [0] and sched.kv.block_ids("b") == [1]
    c = make_request("c", [7, 8, 9], max_new_tokens=1)
    sched.add(c)

    out, finished, summary, _ = step(sched)
    assert out.preempted == [b] and summary == [("a", 4, 1, True)]  # no admission in a preempting step
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.output_token_ids == [500]  # generated tokens are kept and recomputed
    assert list(sched.waiting) == [b, c] and sched.running == [a]
    assert sched.kv.block_ids("b") == [] and sched.kv.block_ids("a") == [0, 1]
    assert sched.stats.num_preemptions == 1 and finished == []
    sched.kv.check_integrity()

    _, finished, summary, _ = step(sched)
    assert summary == [("a", 5, 1, True)] and finished == [a]  # no free block for b yet
    assert a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [500, 501, 502]

    # b comes back ahead of c and recomputes prompt + generated tokens, then samples its second token.
    s = step(sched)
    assert s.summary == [("b", 0, 3, True), ("c", 0, 3, True)]
    assert s.tables == {"b": [1], "c": [0]}
    assert sched.kv.pool.num_evictions == 1  # c took a's cached first block
    assert b.num_cached_tokens == 0 and b.output_token_ids == [500, 501]
    assert c.is_finished
    _, finished, summary, _ = step(sched)
    assert summary == [("b", 3, 1, True)] and finished == [b]
    assert b.output_token_ids == [500, 501, 502] and b.finish_reason is FinishReason.LENGTH
    assert sched.stats.num_preemptions == 1
    assert_idle(sched)


def test_preempted_request_readmitted_with_its_own_cached_blocks():
    sched = make_scheduler(num_blocks=4)
    a = make_request("a", list(range(8)), max_new_tokens=2)
    b = make_request("b", list(range(100, 108)), max_new_tokens=2)
    sched.add(a)
    sched.add(b)
    assert step(sched).summary == [("a", 0, 8, True), ("b", 0, 8, True)]
    assert sched.kv.block_ids("a") == [0, 1] and sched.kv.block_ids("b") == [2, 3]

    out, finished, summary, _ = step(sched)
    assert out.preempted == [b] and summary == [("a", 8, 1, True)] and finished == [a]
    assert sched.kv.pool.num_evictions == 1  # a's new block was b's tail (freed first)
    assert sched.stats.num_computed_prompt_tokens == 16

    # b's head block survived in the prefix cache: only positions 4..8 are recomputed.
    s = step(sched)
    assert s.summary == [("b", 4, 5, True)]
    assert s.tables == {"b": [2, 3, 1]}  # hit 2 revived; 3 (unindexed, a's tail) and 1 (a's evicted block) new
    assert sched.kv.pool.num_evictions == 2
    assert b.num_cached_tokens == 4 and sched.stats.num_prefix_hit_tokens == 4
    assert sched.stats.num_computed_prompt_tokens == 20
    assert b.is_finished and b.output_token_ids == [500, 501]
    assert_idle(sched)


def test_request_preempts_itself_when_it_is_the_latest():
    sched = make_scheduler(num_blocks=2)
    a = make_request("a", [1, 2], max_new_tokens=3)
    b = make_request("b", [3, 4, 5, 6], max_new_tokens=3)
    sched.add(a)
    sched.add(b)
    step(sched)
    out, _, summary, _ = step(sched)  # a fits its decode; b needs a block and is the last admitted: it yields
    assert summary == [("a", 2, 1, True)] and out.preempted == [b]
    assert list(sched.waiting) == [b] and sched.kv.block_ids("b") == []
    assert sched.stats.num_preemptions == 1
    while sched.has_unfinished():
        step(sched)
    assert a.output_token_ids == [500, 501, 502] and b.output_token_ids == [500, 501, 502]
    assert_idle(sched)


# ---------------------------------------------------------------- abort


def test_abort_waiting_and_running_requests_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=8, budget=10, max_batch_size=1)
    a = make_request("a", list(range(20)), max_new_tokens=4)
    b = make_request("b", [1, 2, 3], max_new_tokens=4)
    sched.add(a)
    sched.add(b)
    assert step(sched).summary == [("a", 0, 10, False)]  # a mid-prefill, b waiting
    assert sched.kv.num_free_blocks == 5

    assert sched.abort("b") is b
    assert b.finish_reason is FinishReason.ABORTED and b.is_finished
    assert list(sched.waiting) == [] and "b" not in sched.requests

    assert sched.abort("a") is a
    assert a.finish_reason is FinishReason.ABORTED and sched.running == []
    assert sched.abort("a") is None and sched.abort("nope") is None
    out = sched.schedule()
    assert out.seqs == []
    assert_idle(sched)


def test_abort_of_a_preempted_request():
    sched = make_scheduler(num_blocks=2)
    a = make_request("a", [1, 2, 3, 4], max_new_tokens=3)
    b = make_request("b", [5, 6], max_new_tokens=3)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert step(sched).out.preempted == [b]
    assert sched.abort("b") is b and b.finish_reason is FinishReason.ABORTED
    assert list(sched.waiting) == []
    sched.abort("a")
    assert_idle(sched)


# ---------------------------------------------------------------- finish reasons


def test_length_wins_over_eos():
    sched = make_scheduler()
    r = make_request("r", [1, 2], max_new_tokens=1)
    sched.add(r)
    _, finished, _, _ = step(sched, lambda req: EOS)
    assert finished == [r] and r.finish_reason is FinishReason.LENGTH
    assert r.output_token_ids == [EOS]
    assert_idle(sched)


def test_eos_stops_generation():
    sched = make_scheduler()
    r = make_request("r", [1, 2], max_new_tokens=5)
    sched.add(r)
    fake = scripted({"r": [7, EOS, 8]})
    assert step(sched, fake).finished == []
    _, finished, _, _ = step(sched, fake)
    assert finished == [r] and r.finish_reason is FinishReason.EOS_TOKEN
    assert r.output_token_ids == [7, EOS]
    assert_idle(sched)


def test_ignore_eos_runs_to_max_new_tokens():
    sched = make_scheduler()
    r = make_request("r", [1, 2], max_new_tokens=3, params=SamplingParams(ignore_eos=True))
    sched.add(r)
    finished = [step(sched, lambda req: EOS).finished for _ in range(3)]
    assert finished == [[], [], [r]]
    assert r.finish_reason is FinishReason.LENGTH and r.output_token_ids == [EOS, EOS, EOS]
    assert_idle(sched)


# ---------------------------------------------------------------- plan


def test_make_plan_sends_new_requests_in_full_then_diffs():
    sched = make_scheduler(budget=10)
    a = make_request("a", list(range(10, 16)), max_new_tokens=2)  # 6 tokens
    b = make_request("b", list(range(20, 33)), max_new_tokens=2)  # 13 tokens
    sched.add(a)
    sched.add(b)
    mirror = RunnerMirror()

    out = sched.schedule()
    plan = sched.make_plan(out)
    assert plan.block_size == BS and plan.num_tokens == 10 == out.num_tokens and plan.running == []
    assert [(p.request_id, p.token_ids, p.num_prompt_tokens, p.start, p.num_new, p.block_ids, p.all_logits)
            for p in plan.new] == [
        ("a", list(range(10, 16)), 6, 0, 6, [0, 1], False),
        ("b", list(range(20, 33)), 13, 0, 4, [2], False),
    ]
    assert mirror.apply(plan) == [("a", 0, list(range(10, 16)), [0, 1]), ("b", 0, [20, 21, 22, 23], [2])]
    sched.update(out, sampled({"a": 500}))

    out = sched.schedule()
    plan = sched.make_plan(out)  # both held by the runner now: only what changed
    assert plan.new == [] and plan.finished == []
    assert [(p.request_id, p.token_ids, p.new_block_ids) for p in plan.running] == [
        ("a", [500], []),
        ("b", list(range(24, 33)), [3, 4, 5]),
    ]
    assert mirror.apply(plan) == [("a", 6, [500], [0, 1]), ("b", 4, list(range(24, 33)), [2, 3, 4, 5])]
    sched.update(out, sampled({"a": 501, "b": 600}))
    assert a.is_finished
    out = sched.schedule()
    plan = sched.make_plan(out)
    assert plan.finished == ["a"] and [p.request_id for p in plan.running] == ["b"]
    sched.update(out, sampled({"b": 601}))
    assert_idle(sched)


def test_a_preempted_request_comes_back_in_full():
    sched = make_scheduler(num_blocks=4, budget=100)
    a = make_request("a", list(range(6)), max_new_tokens=8)  # 2 blocks, grows into a third
    b = make_request("b", list(range(10, 16)), max_new_tokens=8)
    sched.add(a)
    sched.add(b)
    mirror = RunnerMirror()
    preempted = None
    for _ in range(20):
        out = sched.schedule()
        plan = sched.make_plan(out)
        for rid, start, ids, table in mirror.apply(plan):
            assert table == sched.kv.block_ids(rid)  # the diffs rebuild the scheduler's tables exactly
            assert ids == sched.requests[rid].token_ids[start : start + len(ids)]
        if out.preempted:
            preempted = out.preempted[0].request_id
        elif preempted is not None and any(p.request_id == preempted for p in plan.new):
            new = next(p for p in plan.new if p.request_id == preempted)
            assert new.start == 0 and new.token_ids == sched.requests[preempted].token_ids  # outputs included
            break
        sched.update(out, sampled({s.request.request_id: 1 for s in out.seqs if s.samples}))
    else:
        raise AssertionError("no preemption and re-admission happened")


# ---------------------------------------------------------------- randomized, checked against a fake KV store


def run_random_workload(seed: int) -> Scheduler:
    """A fake runner keeps a slot → contents map: each computed position p writes the token prefix [0, p] its K/V
    would depend on. Every position a plan treats as cached (below `start`) must read back its own sequence's prefix,
    through prefix hits, chunking, preemption, eviction and aborts."""
    rng = random.Random(seed)
    num_blocks = rng.randint(4, 12)
    sched = make_scheduler(num_blocks, budget=rng.randint(1, 16), max_batch_size=rng.randint(1, 4))
    shared = [rng.randint(0, 3) for _ in range(12)]
    slots: dict[int, tuple[int, ...]] = {}
    requests: list[Request] = []
    mirror = RunnerMirror()
    for _ in range(2000):
        if len(requests) < 10 and rng.random() < 0.3:
            n = rng.randint(1, 10)
            prompt = shared[:n] if rng.random() < 0.5 else [rng.randint(0, 3) for _ in range(n)]
            requests.append(make_request(f"r{len(requests)}", prompt, rng.randint(1, num_blocks * BS - n)))
            sched.add(requests[-1])
        if sched.requests and rng.random() < 0.02:
            sched.abort(rng.choice(sorted(sched.requests)))
        out = sched.schedule()
        assert out.num_tokens <= sched.config.max_batch_prefill_tokens
        for rid, start, ids, table in mirror.apply(sched.make_plan(out)):
            seq = sched.requests[rid].token_ids
            assert table == sched.kv.block_ids(rid) and ids == seq[start : start + len(ids)]
            assert len(table) == sched.kv.blocks_needed(start + len(ids))
            slot = [table[i // BS] * BS + i % BS for i in range(start + len(ids))]
            assert [slots.get(slot[i]) for i in range(start)] == [tuple(seq[: i + 1]) for i in range(start)]
            for i in range(start, start + len(ids)):
                slots[slot[i]] = tuple(seq[: i + 1])
        sched.update(out, sampled({s.request.request_id: rng.choice([0, 1, 2, 3] * 9 + [EOS]) for s in out.seqs if s.samples}))
        sched.kv.check_integrity()
        assert sched.kv.num_tables() == len(sched.running) <= sched.config.max_batch_size
        if len(requests) == 10 and not sched.has_unfinished():
            break
    assert_idle(sched)
    for r in requests:
        assert r.finish_reason in (FinishReason.LENGTH, FinishReason.EOS_TOKEN, FinishReason.ABORTED)
        if r.finish_reason is FinishReason.LENGTH:
            assert r.num_output_tokens == r.max_new_tokens
        if r.finish_reason is FinishReason.EOS_TOKEN:
            assert r.output_token_ids[-1] == EOS and EOS not in r.output_token_ids[:-1]
    return sched


def test_random_workloads_read_back_exactly_what_they_wrote():
    stats = [run_random_workload(seed).stats for seed in range(20)]
    # The seeds do reach the paths under test.
    assert sum(s.num_preemptions for s in stats) > 0
    assert sum(s.num_prefix_hit_tokens for s in stats) > 0
