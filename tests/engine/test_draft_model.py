"""A draft model (`--draft-model-id`): the target itself as its own draft accepts every greedy draft (which only
holds if the draft's KV cache mirrors the target's through prefill chunks, prefix hits and preemption), and any
draft with the same tokenizer leaves the output unchanged."""

from __future__ import annotations

import pytest

from loom import LLM, SamplingParams
from loom.testing.parity import random_prompts

VOCAB = 50257


def _prompts():
    shared = random_prompts([40], VOCAB, seed=50)[0]
    return random_prompts([5, 23], VOCAB, seed=51) + [shared + p for p in random_prompts([3, 30], VOCAB, seed=52)]


def _generate(llm, prompts, params):
    first = llm.generate(prompts[2:3], params)  # caches the shared prefix of the last two
    rest = llm.generate(prompts[:2] + prompts[3:], params)
    return [rest[0], rest[1], first[0], rest[2]]


@pytest.mark.parametrize("engine_args", [
    {},
    {"max_batch_prefill_tokens": 16},  # prompts in chunks next to speculating decodes
    {"max_batch_total_tokens": 160},  # too few blocks: preemption
])
def test_target_as_its_own_draft_accepts_every_draft(llama_dir, engine_args):
    args = {"max_batch_total_tokens": 4096, **engine_args}
    base = LLM(llama_dir, dtype="float32", **args)
    prompts, params = _prompts(), SamplingParams(max_new_tokens=24)
    expected = [r.token_ids for r in _generate(base, prompts, params)]
    llm = LLM(llama_dir, dtype="float32", draft_model=str(llama_dir), speculate=3, **args)
    llm.engine.speculator.cost = None
    got = [r.token_ids for r in _generate(llm, prompts, params)]
    assert got == expected
    stats = llm.engine.speculator.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    if "max_batch_total_tokens" in engine_args:
        assert llm.engine.scheduler.stats.num_preemptions > 0
    llm.engine.check_integrity()


def test_another_draft_model_leaves_outputs_unchanged(llama_dir, tiny_model_factory):
    draft = tiny_model_factory("qwen2")  # same GPT-2 tokenizer, other weights
    prompts = _prompts()
    params = [SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=20, do_sample=True, seed=3),
              SamplingParams(max_new_tokens=20, repetition_penalty=1.2), SamplingParams(max_new_tokens=20)]
    base = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096)
    expected = [r.token_ids for r in base.generate(prompts, params)]
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096, draft_model=str(draft))
    assert llm.engine.config.speculate == 4  # the default number of drafts with a draft model
    llm.engine.speculator.cost = None
    assert [r.token_ids for r in llm.generate(prompts, params)] == expected
    assert llm.engine.speculator.stats.num_draft_tokens > 0


def test_draft_model_with_another_vocabulary_is_refused(llama_dir, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(llama_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]  # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different tokenizer vocabulary"):
        LLM(llama_dir, dtype="float32", max_batch_total_tokens=1024, draft_model=str(other))
