"""The per-step token budget (`max_batch_prefill_tokens`): inferred from this machine's measured matmul rate when not
given (as TGI infers it from the GPU's FLOPs), kept as given otherwise."""

from __future__ import annotations

from loom import LLM


def test_default_budget_is_about_a_second_of_this_machines_compute(llama_dir):
    engine = LLM(llama_dir, dtype="bfloat16").engine
    budget = engine.config.max_batch_prefill_tokens
    assert engine.scheduler.config.max_batch_prefill_tokens == budget
    rate = engine.runner.linear_tokens_per_second()
    assert rate is not None and rate > 0
    assert budget % 256 == 0 and 256 <= budget <= 4096
    # the rule itself, with room for the rate measured again a moment later being a little different
    assert budget == 4096 or budget <= rate * 1.5


def test_a_given_budget_is_kept(llama_dir):
    assert LLM(llama_dir, dtype="float32", max_batch_prefill_tokens=300).engine.config.max_batch_prefill_tokens == 300
