"""The C++ prompt-chunk attention kernel (AVX-512 BF16 CPUs) against a plain float64 reference: fresh prompts and
chunks that continue one, GQA, sliding windows, head sizes 32-256, lengths off the 16-key blocks, scattered slots."""

from __future__ import annotations

import pytest
import torch

from loom.layers.kernels import prefill_attention_cpu

pytestmark = pytest.mark.skipif(prefill_attention_cpu.load() is None, reason="no AVX-512 BF16 or no C++ toolchain")


def reference(q, k_cache, v_cache, slots, q_start, scale, window):
    group = q.shape[1] // k_cache.shape[1]
    k = k_cache[slots].double().repeat_interleave(group, 1)  # (ctx, Hq, D)
    v = v_cache[slots].double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(q_start, q_start + q.shape[0]).unsqueeze(1)
    k_pos = torch.arange(slots.shape[0]).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window > 0:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("q_len,q_start", [(1, 0), (37, 0), (256, 0), (20, 45), (16, 16), (5, 70)])
@pytest.mark.parametrize("window", [-1, 24])
def test_kernel_matches_reference(head_dim, q_len, q_start, window):
    gen = torch.Generator().manual_seed(head_dim + q_len + q_start)
    q_heads, kv_heads = 6, 2
    ctx = q_start + q_len
    num_slots = 2 * ctx + 32
    k_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen).bfloat16()
    slots = torch.randperm(num_slots, generator=gen)[:ctx]
    q = torch.randn(q_len, q_heads, head_dim, generator=gen).bfloat16()
    scale = head_dim**-0.5
    got = prefill_attention_cpu.prefill_attention(q, k_cache, v_cache, slots, q_start, scale, window)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    expected = reference(q, k_cache, v_cache, slots, q_start, scale, window)
    # bf16 output, probabilities rounded to bf16 before the second product (as FlashAttention does)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)
