"""Checks that a Loom model matches `transformers` (the oracle) on a checkpoint: logits at every position over
the paged KV cache, and greedy generation through `loom.LLM` in a mixed batch and with prefix-cache hits."""

from __future__ import annotations

from pathlib import Path

import torch

from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.protocol.plan import NewSeq, RunningSeq, StepPlan
from loom.sampling_params import SamplingParams
from loom.worker.runner import ModelRunner

BLOCK = 16


def hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def paged_logits(runner: ModelRunner, kv: KVCacheManager, ids: list[int], chunk: int) -> torch.Tensor:
    """All-position logits of `ids`, computed `chunk` tokens per step over the paged cache (1 = decode path)."""
    assert kv.allocate("parity", len(ids))
    try:
        out = []
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            if start == 0:
                first = NewSeq("parity", list(ids), len(ids), 0, len(piece), kv.block_ids("parity"), SamplingParams(),
                               all_logits=True)
                plan = StepPlan([first], [], [], kv.block_size)
            else:
                plan = StepPlan([], [RunningSeq("parity", start, piece)], [], kv.block_size)
            out.append(runner.forward_logits(plan))
        return torch.cat(out)
    finally:
        kv.free("parity")
        runner.forward_logits(StepPlan([], [], ["parity"], kv.block_size))  # the runner drops its state


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def assert_logits_parity(path: str | Path, lengths=(1, 7, 33, 100), chunks=(None, 5, 1), atol: float = 1e-4,
                         vocab: int = 50257, hf=None, quantize: str | None = None) -> None:
    """float32 logits equal transformers' at every position, whether the prompt runs in one prefill, in chunks
    that attend to cached blocks, or one token at a time through the decode path. `hf`: the oracle model when it
    is not `from_pretrained(path)` (a GGUF file)."""
    hf = hf if hf is not None else hf_model(path)
    num_blocks = -(-max(lengths) // BLOCK) + 1
    runner = ModelRunner(ModelConfig.from_dir(path, "float32", quantize), num_blocks=num_blocks, block_size=BLOCK)
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=False)
    for ids in random_prompts(list(lengths), vocab, seed=1):
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].float()
        for chunk in chunks:
            got = paged_logits(runner, kv, ids, chunk or len(ids))
            diff = (got - expected).abs().max().item()
            assert diff <= atol, f"{path}: length {len(ids)}, chunk {chunk}: max abs diff {diff}"
    kv.check_integrity()


def assert_greedy_parity(path: str | Path, lengths=(3, 17, 40), new_tokens: int = 32, vocab: int = 50257,
                         **llm_args) -> None:
    """Greedy tokens equal transformers `generate`: a mixed-length batch together, then again with a shared
    prefix so that the second pass hits the prefix cache; and all of it again with speculative decoding, drafts
    from transformers' own output with some made wrong (so that every acceptance length occurs)."""
    from loom import LLM, SamplingParams
    from loom.testing.speculation import OracleProposer

    hf = hf_model(path)
    llm = LLM(path, dtype="float32", **{"max_batch_total_tokens": 4096, "speculate": 3, **llm_args})
    speculator = llm.engine.scheduler.speculator
    assert speculator is not None
    speculator.cost = None  # verify every draft, whatever it costs
    prompts = random_prompts(list(lengths), vocab, seed=2)
    shared = random_prompts([2 * BLOCK], vocab, seed=3)[0]
    with_prefix = [shared + p for p in prompts]
    expected = {}
    for prompt in prompts + with_prefix:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
        expected[tuple(prompt)] = out[0, len(prompt) :].tolist()
    speculator.proposer = OracleProposer([list(p) + e for p, e in expected.items()], vocab, wrong_rate=0.3)
    for speculate in (False, True):
        llm.engine.scheduler.speculator = speculator if speculate else None
        # the first prefixed prompt alone fills the cache; the batch after it then starts from cached blocks
        for batch in (prompts, with_prefix[:1], with_prefix):
            results = llm.generate(batch, SamplingParams(max_new_tokens=new_tokens))
            for prompt, result in zip(batch, results):
                assert result.token_ids == expected[tuple(prompt)], \
                    f"{path}: prompt of {len(prompt)} tokens{', speculating' if speculate else ''}"
    assert llm.engine.scheduler.stats.num_prefix_hit_tokens >= BLOCK  # the shared prefix was reused
    stats = speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # drafts were accepted and rejected
    llm.engine.check_integrity()
    # the model as its own draft model (--draft-model-id): its cache mirrors the target's through the family's own
    # attention (sliding windows, soft-capping), so its greedy drafts are the target's tokens
    drafted = LLM(path, dtype="float32", **{"max_batch_total_tokens": 4096, "speculate": 3, **llm_args,
                                            "draft_model": str(path)})
    assert drafted.engine.speculator is not None
    drafted.engine.speculator.cost = None
    for batch in (prompts, with_prefix[:1], with_prefix):
        results = drafted.generate(batch, SamplingParams(max_new_tokens=new_tokens))
        for prompt, result in zip(batch, results):
            assert result.token_ids == expected[tuple(prompt)], f"{path}: prompt of {len(prompt)} tokens, own draft"
    stats = drafted.engine.speculator.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens >= 0.9 * stats.num_draft_tokens, stats
    drafted.engine.check_integrity()


def make_checkpoint(out_dir: str | Path, config, tokenizer_from: str | Path, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Save a random model for any transformers config (e.g. `transformers.Phi3Config(...)`) with the GPT-2 test
    tokenizer copied from `tokenizer_from`."""
    from transformers import AutoModelForCausalLM

    from loom.testing.tiny_models import copy_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(tokenizer_from, out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
