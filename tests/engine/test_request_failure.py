"""A request whose own part of a step raises (its sampling, its grammar) fails alone: the other requests of the batch
get exactly the tokens they would have got without it, every KV block comes back, the engine goes on serving.

The faults are injected where a request's own processing runs (a warper only that request uses, its grammar
matcher), standing for any defect or input that makes that code raise."""

from __future__ import annotations

import pytest

from loom import LLM, GrammarSpec, SamplingParams
from loom.worker import sampler as sampler_module
from loom.worker.sampler import _Warper


class Boom(RuntimeError):
    pass


def _raise(*_args) -> None:
    raise Boom("injected fault\nsecond line never shown")


def raising_after(calls: int):
    """A warper that works `calls` times, then raises: the request fails mid-generation."""
    left = [calls]

    def apply(scores, values) -> None:
        left[0] -= 1
        if left[0] < 0:
            _raise()
        sampler_module._typical_p(scores, values)

    return apply


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), dtype="float32", max_batch_total_tokens=4096, max_total_tokens=512)


def _integrity(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished()
    engine.check_integrity()
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks  # idle: every block free or cached


PROMPTS = ["The quick brown fox", "Hello there", "One two three four five six"]


def _params(seed: int | None) -> SamplingParams:
    if seed is None:
        return SamplingParams(max_new_tokens=12, ignore_eos=True)
    return SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=0.8, seed=seed)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
def test_a_request_whose_sampling_raises_fails_alone(llm, monkeypatch, sampled):
    seeds = [11, 22, 33] if sampled else [None] * 3
    expected = [r.token_ids for r in llm.generate(PROMPTS, [_params(s) for s in seeds])]

    # typical_p is a warper only the faulty request uses: its rows raise, in the batch and alone
    warpers = list(sampler_module._WARPERS)
    warpers[3] = _Warper(warpers[3].value, _raise)
    monkeypatch.setattr(sampler_module, "_WARPERS", tuple(warpers))
    faulty = SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=True, typical_p=0.5, seed=5)
    results = llm.generate(PROMPTS[:2] + ["A faulty request"] + PROMPTS[2:],
                           [_params(seeds[0]), _params(seeds[1]), faulty, _params(seeds[2])])

    failed = results.pop(2)
    assert failed.error == "Server error: injected fault"
    assert failed.finish_reason is None and failed.token_ids == []
    assert [r.token_ids for r in results] == expected  # seeded draws too: the generators were restored
    assert all(r.finish_reason == "length" and r.error is None for r in results)
    _integrity(llm)
    monkeypatch.undo()
    assert llm.generate(PROMPTS, [_params(s) for s in seeds])[0].token_ids == expected[0]  # the engine goes on


class FaultyMatcher:
    """An llguidance matcher that raises when asked for its mask after `good_masks` masks."""

    def __init__(self, inner, good_masks: int, where: str):
        self._inner, self._left, self._where = inner, good_masks, where

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def unsafe_compute_mask_ptr(self, *args):
        if self._where == "mask" and self._left == 0:
            raise Boom("matcher state corrupted")
        self._left -= 1
        return self._inner.unsafe_compute_mask_ptr(*args)

    def consume_token(self, token):
        if self._where == "advance" and self._left <= 0:
            raise Boom("matcher refused to advance")
        return self._inner.consume_token(token)


@pytest.mark.parametrize("where", ["mask", "advance"])
def test_a_request_whose_grammar_raises_fails_alone(llm, where):
    engine = llm.engine
    tokenizer = llm.tokenizer
    expected = [r.token_ids for r in llm.generate(PROMPTS, _params(None))]
    grammar = GrammarSpec.regex("[a-z ]{1,40}")
    guided = SamplingParams(max_new_tokens=12, ignore_eos=True, grammar=grammar)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    engine.add_request("a", ids[0], _params(None))
    bad = engine.add_request("bad", tokenizer.encode("A constrained request"), guided)
    bad.grammar = FaultyMatcher(bad.grammar, good_masks=3, where=where)
    engine.add_request("b", ids[1], _params(None))
    engine.add_request("c", ids[2], _params(None))
    tokens: dict[str, list[int]] = {"a": [], "b": [], "c": [], "bad": []}
    errors = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.error is not None:
                errors[out.request_id] = out.error
    assert errors == {"bad": "Server error: matcher state corrupted" if where == "mask"
                      else "Server error: matcher refused to advance"}
    assert 0 < len(tokens["bad"]) < 12
    assert [tokens["a"], tokens["b"], tokens["c"]] == expected
    _integrity(llm)


def test_a_failing_request_among_speculating_ones(llama_dir, monkeypatch):
    """Requests with drafts have several sampler rows each: when one request's rows raise, the others' rows (and the
    drafts they accept) are those of the batch."""
    llm = LLM(str(llama_dir), dtype="float32", max_batch_total_tokens=4096, max_total_tokens=512, speculate=3)
    llm.engine.speculator.cost = None  # verify every draft proposed (not a timing-based choice)
    prompts = ["a b c d a b c d a b c d a b", "one two one two one two one"]
    params = [_params(7), _params(None)]
    expected = [r.token_ids for r in llm.generate(prompts, params)]
    warpers = list(sampler_module._WARPERS)
    warpers[3] = _Warper(warpers[3].value, raising_after(4))  # fails once the others verify drafts
    monkeypatch.setattr(sampler_module, "_WARPERS", tuple(warpers))
    faulty = SamplingParams(max_new_tokens=12, ignore_eos=True, do_sample=True, typical_p=0.5, seed=5)
    drafted = llm.engine.speculator.stats.num_draft_tokens
    results = llm.generate(prompts + ["a b a b a b a b"], params + [faulty])
    assert results[2].error == "Server error: injected fault"
    assert 0 < len(results[2].token_ids) < 12
    assert llm.engine.speculator.stats.num_draft_tokens > drafted
    assert [r.token_ids for r in results[:2]] == expected
    _integrity(llm)
