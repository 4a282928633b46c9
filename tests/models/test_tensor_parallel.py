"""Tensor parallelism on CPU: two gloo ranks (this process is rank 0, a spawned one is rank 1) against one rank.

Greedy tokens must equal the one-rank engine's in float32, through `loom.LLM` and, for every family, through the
engine; each rank must hold about half the weights; a head count the ranks cannot split is refused before any
process starts.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil

import pytest
import transformers

from loom import LLM, SamplingParams
from loom.config import ModelConfig
from loom.distributed.parallel_state import TPGroup, get_tp_group, kv_head_range
from loom.models.registry import check_tensor_parallel
from loom.engine.core import EngineCore
from loom.testing.parity import make_checkpoint, random_prompts
from loom.testing.speculation import OracleProposer

from .test_gemma import DIMS as GEMMA_DIMS
from .test_gpt2_neox_falcon import _config as classic_config
from .test_moe import _config as moe_config
from .test_phi3_starcoder2_olmo2 import CONFIGS as PHI_CONFIGS

BLOCK = 16
ENGINE_ARGS = {"max_batch_total_tokens": 4096}


def _prompts() -> list[list[int]]:
    """A mixed batch, then the same prompts behind a shared two-block prefix (prefix-cache hits)."""
    prompts = random_prompts([3, 17, 40], 50257, seed=2)
    shared = random_prompts([2 * BLOCK], 50257, seed=3)[0]
    return prompts + [shared + p for p in prompts]


def _greedy(engine: EngineCore, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The first prompt alone, then the rest as one batch (so the prefixed ones find the prefix cached)."""
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for batch in (range(1), range(1, len(prompts))):
        for i in batch:
            engine.add_request(f"r{i}", prompts[i], SamplingParams(max_new_tokens=new_tokens))
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id].extend(o.new_token_ids)
    engine.check_integrity()
    return list(out.values())


# --- start-up checks (no processes) ---------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads, size, expected", [
    (8, 2, [(0, 4), (4, 4)]),
    (2, 2, [(0, 1), (1, 1)]),
    (1, 2, [(0, 1), (0, 1)]),  # multi-query: the one head on both ranks
    (2, 4, [(0, 1), (0, 1), (1, 1), (1, 1)]),  # ranks 0-1 read head 0, ranks 2-3 head 1
])
def test_kv_heads_are_split_or_replicated(kv_heads, size, expected):
    assert [kv_head_range(kv_heads, TPGroup(r, size)) for r in range(size)] == expected


def test_head_counts_the_ranks_cannot_split_are_refused(llama_dir, tmp_path):
    config = ModelConfig.from_dir(llama_dir)  # 4 query heads, 2 key/value heads
    check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 4)  # each key/value head on two ranks
    with pytest.raises(ValueError, match="4 attention heads, which 3 tensor-parallel shards cannot split evenly"):
        check_tensor_parallel(config, 3)
    odd = tmp_path / "six-kv"
    shutil.copytree(llama_dir, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg.update(num_attention_heads=12, num_key_value_heads=6, head_dim=16)
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"key/value heads \(6\) cannot be shared by 4 tensor-parallel ranks"):
        check_tensor_parallel(ModelConfig.from_dir(odd), 4)


def test_llm_refuses_an_impossible_size_before_spawning(llama_dir):
    with pytest.raises(ValueError, match="4 attention heads"):
        LLM(llama_dir, dtype="float32", tensor_parallel_size=3)
    assert multiprocessing.active_children() == []
    assert get_tp_group().size == 1


# --- two ranks ---------------------------------------------------------------------------------------------

def test_llm_two_ranks_match_one_rank_with_half_the_weights_each(llama_dir):
    prompts, params = _prompts(), SamplingParams(max_new_tokens=24)
    batches = (prompts[:4], prompts[4:])  # the second batch starts from the prefix the first one cached

    one = LLM(llama_dir, dtype="float32", **ENGINE_ARGS)
    expected = [r.token_ids for batch in batches for r in one.generate(batch, params)]
    [full] = one.engine.runner.rank_weight_bytes
    with LLM(llama_dir, dtype="float32", tensor_parallel_size=2, speculate=3, **ENGINE_ARGS) as llm:
        speculator = llm.engine.scheduler.speculator
        llm.engine.scheduler.speculator = None
        results = [r for batch in batches for r in llm.generate(batch, params)]
        per_rank = llm.engine.runner.rank_weight_bytes
        hits = llm.engine.scheduler.stats.num_prefix_hit_tokens
        # with speculation: the other rank learns from each plan's start how many drafts rank 0 accepted
        speculator.cost = None
        speculator.proposer = OracleProposer([p + e for p, e in zip(prompts, expected)], 50257, wrong_rate=0.3)
        llm.engine.scheduler.speculator = speculator
        speculated = [r for batch in batches for r in llm.generate(batch, params)]
        llm.engine.check_integrity()
        [worker] = multiprocessing.active_children()
    assert [r.token_ids for r in results] == expected
    assert [r.token_ids for r in speculated] == expected
    assert 0 < speculator.stats.num_accepted_tokens < speculator.stats.num_draft_tokens
    assert hits >= BLOCK
    # every matrix is split in two; only the norms (a few hundred floats) are on both ranks
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert 0.5 <= per_rank[0] / full < 0.501, (per_rank, full)
    worker.join(5)
    assert worker.exitcode == 0
    assert get_tp_group().size == 1


def _family_checkpoints(tiny_model_factory, tmp_path_factory, tokenizer_dir) -> dict[str, object]:
    def make(name, config):
        return make_checkpoint(tmp_path_factory.mktemp(f"tp-{name}"), config, tokenizer_dir)

    paths = {name: tiny_model_factory(name) for name in ("llama", "mistral-swa", "qwen2", "qwen3")}
    for name in ("phi3-swa", "starcoder2-swa", "olmo2"):
        paths[name] = make(name, PHI_CONFIGS[name][0]())
    paths["gemma2"] = make("gemma2", transformers.Gemma2Config(**GEMMA_DIMS, attn_logit_softcapping=1.0,
                                                               final_logit_softcapping=2.0))
    paths["gemma3"] = make("gemma3", transformers.Gemma3TextConfig(
        **GEMMA_DIMS, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False))
    for name in ("mixtral", "qwen2_moe", "qwen3_moe"):
        paths[name] = make(name, moe_config(name))
    for name in ("gpt2", "pythia", "falcon-40b", "falcon-7b"):  # falcon-7b: one KV head, replicated
        paths[name] = make(name, classic_config(name))
    return paths


@pytest.mark.slow  # sixteen families, one spawned rank shared by all: about a minute on two cores
def test_every_family_two_ranks_match_one_rank(tiny_model_factory, tmp_path_factory, tokenizer_dir):
    from loom.config import EngineConfig
    from loom.worker.tp_worker import LocalRanks

    paths = _family_checkpoints(tiny_model_factory, tmp_path_factory, tokenizer_dir)
    prompts = _prompts()
    expected = {name: _greedy(EngineCore(p, "float32", EngineConfig(**ENGINE_ARGS)), prompts, 16)
                for name, p in paths.items()}
    ranks = LocalRanks(2)
    try:
        for name, path in paths.items():
            # each engine's runner tells rank 1 to load the next model in place of the last
            got = _greedy(EngineCore(path, "float32", EngineConfig(**ENGINE_ARGS)), prompts, 16)
            assert got == expected[name], name
    finally:
        ranks.close()
    assert get_tp_group().size == 1
