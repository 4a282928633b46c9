"""Sampling parameters through the whole engine: each one's effect, seeds, stop rules and logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from loom import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", max_batch_total_tokens=8192)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(0, 50257, (12,), generator=torch.Generator().manual_seed(20)).tolist()


def _one(llm: LLM, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**kw))[0]


def _repeats(ids: list[int]) -> int:
    return sum(c - 1 for c in Counter(ids).values())


def test_seed_gives_same_tokens_whatever_the_batch(llm, prompt):
    params = SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.5, seed=1234)
    alone = llm.generate([prompt], params)[0].token_ids
    others = [prompt[:5], prompt[3:], list(reversed(prompt))]
    mixed = [SamplingParams(max_new_tokens=30, do_sample=True, seed=7), SamplingParams(max_new_tokens=10),
             SamplingParams(max_new_tokens=25, top_k=5, seed=99)]
    for position in range(3):
        prompts = others[:position] + [prompt] + others[position:]
        params_list = mixed[:position] + [params] + mixed[position:]
        assert llm.generate(prompts, params_list)[position].token_ids == alone
    assert llm.generate([prompt], SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.5, seed=1235))[
        0
    ].token_ids != alone


def test_random_seed_is_reported_and_reproduces(llm, prompt):
    first = _one(llm, prompt, max_new_tokens=16, do_sample=True)
    assert first.seed is not None
    again = _one(llm, prompt, max_new_tokens=16, do_sample=True, seed=first.seed)
    assert again.token_ids == first.token_ids
    assert _one(llm, prompt, max_new_tokens=4).seed is None  # greedy: no seed


def test_greedy_is_default_and_deterministic(llm, prompt):
    a, b = _one(llm, prompt, max_new_tokens=16), _one(llm, prompt, max_new_tokens=16)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16


def test_temperature_spreads_the_distribution(llm, prompt):
    greedy = _one(llm, prompt, max_new_tokens=16).token_ids
    cold = [_one(llm, prompt, max_new_tokens=16, temperature=0.01, seed=s).token_ids for s in range(3)]
    hot = [_one(llm, prompt, max_new_tokens=16, temperature=5.0, seed=s).token_ids for s in range(3)]
    def agreement(runs):  # share of steps whose token equals greedy's (tiny random models have near-ties)
        return sum(a == b for run in runs for a, b in zip(run, greedy)) / (len(runs) * len(greedy))

    assert agreement(cold) >= 0.8
    assert agreement(hot) <= 0.3


def test_top_k_one_is_greedy(llm, prompt):
    greedy = _one(llm, prompt, max_new_tokens=16).token_ids
    assert _one(llm, prompt, max_new_tokens=16, top_k=1, temperature=3.0, seed=5).token_ids == greedy
    assert _one(llm, prompt, max_new_tokens=16, top_k=1000, temperature=3.0, seed=5).token_ids != greedy


def test_tiny_top_p_is_greedy(llm, prompt):
    greedy = _one(llm, prompt, max_new_tokens=16).token_ids
    assert _one(llm, prompt, max_new_tokens=16, top_p=1e-6, seed=6).token_ids == greedy
    assert _one(llm, prompt, max_new_tokens=16, top_p=0.99, seed=6).token_ids != greedy


def test_typical_p_narrows_sampling(llm, prompt):
    wide = _one(llm, prompt, max_new_tokens=16, do_sample=True, seed=8, details=True)
    narrow = _one(llm, prompt, max_new_tokens=16, typical_p=0.05, seed=8, details=True)
    # logprobs are of the warped distribution: a small typical mass keeps few tokens, so each pick is likelier
    assert sum(narrow.logprobs) / 16 > sum(wide.logprobs) / 16 + math.log(4)


@pytest.mark.parametrize("penalty", [
    dict(repetition_penalty=50.0), dict(frequency_penalty=2.0), dict(presence_penalty=2.0),
])
def test_penalties_reduce_repetition(llm, penalty):
    # A short prompt: TGI's frequency penalty is divided by the sequence length, so it bites early on.
    prompt = [464]
    plain = _one(llm, prompt, max_new_tokens=40).token_ids
    penalised = _one(llm, prompt, max_new_tokens=40, **penalty).token_ids
    assert _repeats(plain) > 0  # the tiny random model loops without a penalty
    assert _repeats(penalised) < _repeats(plain)
    assert not set(penalised) & set(prompt) or "frequency_penalty" in penalty


def test_negative_frequency_penalty_encourages_repetition(llm):
    plain = _one(llm, [464], max_new_tokens=40).token_ids
    assert _repeats(_one(llm, [464], max_new_tokens=40, frequency_penalty=-2.0).token_ids) > _repeats(plain) + 10


def test_max_new_tokens_and_length(llm, prompt):
    r = _one(llm, prompt, max_new_tokens=5, ignore_eos=True)
    assert len(r.token_ids) == 5 and r.finish_reason == "length"


def test_eos_stops_unless_ignored(llm, prompt):
    greedy = _one(llm, prompt, max_new_tokens=12).token_ids
    engine = llm.engine
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({greedy[6]})
    try:
        stopped = _one(llm, prompt, max_new_tokens=12)
        ignored = _one(llm, prompt, max_new_tokens=12, ignore_eos=True)
        last = _one(llm, prompt, max_new_tokens=greedy.index(greedy[6]) + 1)
    finally:
        engine.eos_token_ids = saved
    first = greedy.index(greedy[6])
    assert stopped.token_ids == greedy[: first + 1] and stopped.finish_reason == "eos_token"
    assert ignored.token_ids == greedy and ignored.finish_reason == "length"
    assert last.finish_reason == "length"  # TGI: length is checked before EOS on the same token


def test_stop_sequence_keeps_the_stop_text(llm, prompt):
    full = _one(llm, prompt, max_new_tokens=20)
    # TGI matches stop sequences as a suffix of the text after each token, so end the stop text on a token edge
    head = llm.tokenizer.decode(full.token_ids[:10])
    stop = head[-5:]
    assert stop.strip()
    r = _one(llm, prompt, max_new_tokens=20, stop=["never-appears", stop])
    assert r.finish_reason == "stop_sequence"
    assert r.text.endswith(stop) and full.text.startswith(r.text)
    assert r.token_ids == full.token_ids[: len(r.token_ids)] and len(r.token_ids) <= 10


def test_length_wins_over_a_stop_sequence_on_the_same_token(llm, prompt):
    full = _one(llm, prompt, max_new_tokens=20)
    stop = llm.tokenizer.decode(full.token_ids[:10])[-5:]
    first = _one(llm, prompt, max_new_tokens=20, stop=[stop])
    n = len(first.token_ids)  # the token that completes the stop text
    r = _one(llm, prompt, max_new_tokens=n, stop=[stop])
    assert first.finish_reason == "stop_sequence" and r.finish_reason == "length"  # TGI: length, EOS, then stop
    assert r.token_ids == first.token_ids


def test_details_logprobs_match_transformers(llm, prompt, llama_dir):
    r = _one(llm, prompt, max_new_tokens=8, details=True, top_n_tokens=3)
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + r.token_ids])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(r.logprobs), expected, atol=1e-4)
    assert len(r.top_tokens) == 8
    for chosen, lp, top in zip(r.token_ids, r.logprobs, r.top_tokens):
        assert len(top) >= 3 and top[0][0] == chosen and top[0][1] == pytest.approx(lp)
        assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)


def test_invalid_parameters_are_refused_with_tgi_messages(llm, prompt):
    with pytest.raises(ValueError, match="`temperature` must be strictly positive"):
        _one(llm, prompt, temperature=0.0)
    with pytest.raises(ValueError, match=r"`top_p` must be > 0.0 and < 1.0"):
        _one(llm, prompt, top_p=1.0)
    with pytest.raises(ValueError, match="`top_k` must be strictly positive"):
        _one(llm, prompt, top_k=0)
    assert not llm.engine.has_unfinished()
    llm.engine.check_integrity()


def test_text_prompts_are_tokenized(llm):
    r = llm.generate("Hello, my name is", SamplingParams(max_new_tokens=4))[0]
    assert r.prompt == "Hello, my name is"
    assert r.prompt_token_ids == llm.tokenizer.encode("Hello, my name is")
    assert r.text == llm.tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_prompt_logprobs_match_transformers(prompt, llama_dir):
    # a tiny step budget sends the prompt through several chunks
    engine = LLM(llama_dir, dtype="float32", max_batch_total_tokens=256, max_batch_prefill_tokens=5).engine
    engine.add_request("plp", prompt, SamplingParams(max_new_tokens=2), prompt_logprobs=True)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == "plp"]
    got = outputs[0].prompt_logprobs
    assert outputs[1].prompt_logprobs is None  # sent once, with the first token
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert got[0] is None and len(got) == len(prompt)
    assert torch.allclose(torch.tensor(got[1:]), expected, atol=1e-4)
