"""The C++ paged decode-attention kernel against a plain torch reference: every dtype, head sizes on the SIMD paths
(AVX-512 or AVX2, whichever this CPU has; with AVX-512 BF16, bf16 caches at head sizes 64/96/128/256 take the
bf16 dot-product path) and off them, GQA, sliding windows, scattered block tables, contexts that end inside and on
a 16-token group."""

from __future__ import annotations

import pytest
import torch

from loom.layers.kernels import paged_decode_cpu

kernel = paged_decode_cpu.load()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C++ toolchain: the torch path is used instead")


def reference(q, k_cache, v_cache, tables, lens, block_size, scale, window):
    out = []
    group = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lens[b])
        slots = torch.cat([torch.arange(int(x) * block_size, (int(x) + 1) * block_size) for x in tables[b]])[:n]
        first = max(0, n - window) if window > 0 else 0
        k = k_cache[slots[first:]].double().repeat_interleave(group, 1)
        v = v_cache[slots[first:]].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,thd->ht", q[b].double(), k) * scale
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 48, 96, 256])
@pytest.mark.parametrize("window", [-1, 9])
def test_kernel_matches_reference(dtype, head_dim, window):
    gen = torch.Generator().manual_seed(head_dim)
    batch, q_heads, kv_heads, max_len, block_size = 7, 6, 2, 150, 16
    blocks_per_seq = -(-max_len // block_size)
    num_blocks = batch * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    tables = (torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks_per_seq].view(batch, -1) + 1).int()
    lens = torch.tensor([1, 9, 16, 17, 70, 32, 150], dtype=torch.int32)
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype)
    got = kernel.paged_decode(q, k_cache, v_cache, tables, lens, block_size, 0.3, window)
    assert got.dtype == dtype
    expected = reference(q, k_cache, v_cache, tables, lens, block_size, 0.3, window)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), expected.to(got.dtype).double(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv_equals_index_copy(dtype):
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, 64, 3, 8, dtype=dtype)
    qkv = torch.randn(5, 4 * 3 * 8, generator=gen).to(dtype)  # k and v as strided slices of a fused output
    k = qkv[:, 24:48].view(5, 3, 8)
    v = qkv[:, 48:72].view(5, 3, 8)
    slots = torch.tensor([7, 0, 63, 20, 21])
    assert paged_decode_cpu.store_kv(cache, slots, k, v)
    expected = torch.zeros_like(cache)
    expected[0].index_copy_(0, slots, k)
    expected[1].index_copy_(0, slots, v)
    assert torch.equal(cache, expected)
    with pytest.raises(RuntimeError, match="slot out of range"):
        paged_decode_cpu.store_kv(cache, torch.tensor([0, 1, 2, 3, 64]), k, v)
