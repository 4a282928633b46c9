"""Continuous batching gives each request the tokens it would get alone: batch invariance, chunked prefill,
prefix caching and preemption, checked against single-request greedy runs on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams

GREEDY_24 = SamplingParams(max_new_tokens=24)


def _prompts(n: int, lengths: list[int], seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def alone(llama_dir):
    """Reference: each prompt generated on its own, no prefix cache, no chunking."""
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096, enable_prefix_caching=False)

    def run(prompts: list[list[int]], params: SamplingParams = GREEDY_24) -> list[list[int]]:
        return [llm.generate([p], params)[0].token_ids for p in prompts]

    return run


def test_batch_of_eight_equals_each_alone(llama_dir, alone):
    prompts = _prompts(8, [3, 50, 9, 130, 17, 1, 64, 33])
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096)
    together = [r.token_ids for r in llm.generate(prompts, GREEDY_24)]
    assert together == alone(prompts)
    llm.engine.check_integrity()


def test_tiny_prefill_chunks_equal_no_chunking(llama_dir, alone):
    prompts = _prompts(4, [70, 5, 41, 100], seed=4)
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096, max_batch_prefill_tokens=7)
    chunked = [r.token_ids for r in llm.generate(prompts, GREEDY_24)]
    assert chunked == alone(prompts)
    assert llm.engine.scheduler.stats.num_steps > 100 // 7  # the long prompt really was split
    llm.engine.check_integrity()


def test_prefix_cache_computes_only_the_suffix(llama_dir, alone):
    block = 16
    shared = _prompts(1, [3 * block], seed=5)[0]
    first = shared + _prompts(1, [5], seed=6)[0]
    second = shared + _prompts(1, [11], seed=7)[0]
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096, block_size=block)
    stats = llm.engine.scheduler.stats
    r1 = llm.generate([first], GREEDY_24)[0]
    computed_before = stats.num_computed_prompt_tokens
    r2 = llm.generate([second], GREEDY_24)[0]
    assert r1.num_cached_tokens == 0
    assert r2.num_cached_tokens == 3 * block
    assert stats.num_computed_prompt_tokens - computed_before == 11  # only the suffix ran through the model
    assert [r1.token_ids, r2.token_ids] == alone([first, second])
    llm.engine.check_integrity()


def test_identical_prompt_hits_all_but_the_last_block(llama_dir):
    prompt = _prompts(1, [48], seed=8)[0]  # exactly 3 blocks: the last token must still be computed
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096, block_size=16)
    a = llm.generate([prompt], GREEDY_24)[0]
    b = llm.generate([prompt], GREEDY_24)[0]
    assert b.num_cached_tokens == 32
    assert a.token_ids == b.token_ids
    llm.engine.check_integrity()


def test_prefix_cache_eviction_under_pressure(llama_dir, alone):
    # 12 blocks of 16 tokens: each request needs ~5 blocks, so cached blocks of earlier requests get evicted.
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=12 * 16, block_size=16)
    prompts = _prompts(6, [60, 52, 64], seed=9)
    results = [llm.generate([p], GREEDY_24)[0].token_ids for p in prompts]
    assert llm.engine.kv.pool.num_evictions > 0
    assert results == alone(prompts)
    llm.engine.check_integrity()
    assert llm.engine.kv.num_free_blocks == 12  # nothing held once idle (cached blocks are reclaimable)


def test_preemption_completes_every_request_with_the_same_output(llama_dir, alone):
    prompts = _prompts(8, [40, 20, 33, 9], seed=10)
    params = SamplingParams(max_new_tokens=40)
    # 16 blocks × 8 tokens = 128 KV slots, far less than 8 × ~70 tokens: requests must be preempted and recomputed.
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=128, block_size=8, max_total_tokens=128)
    results = llm.generate(prompts, params)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert [r.token_ids for r in results] == alone(prompts, params)
    assert all(r.finish_reason in ("length", "eos_token") for r in results)
    llm.engine.check_integrity()
    assert llm.engine.kv.num_free_blocks == 16


def test_abort_frees_blocks_at_once(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=1024, block_size=16)
    engine = llm.engine
    for i, p in enumerate(_prompts(3, [40], seed=11)):
        engine.add_request(f"r{i}", p, SamplingParams(max_new_tokens=50))
    engine.step()
    engine.step()
    assert engine.kv.num_free_blocks < 64
    for i in range(3):
        assert engine.abort_request(f"r{i}")
    assert not engine.has_unfinished()
    engine.check_integrity()
    assert engine.kv.num_free_blocks == 64


def test_request_too_long_for_the_context_is_refused(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=1024, max_total_tokens=64)
    with pytest.raises(ValueError, match=r"must be <= 64"):
        llm.generate([list(range(60))], SamplingParams(max_new_tokens=10))
    llm.engine.check_integrity()
    assert not llm.engine.has_unfinished()
