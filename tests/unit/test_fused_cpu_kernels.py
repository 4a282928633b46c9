"""The fused CPU kernels (RMSNorm, rotary) against the torch code they replace, in every dtype:
the same values, up to one rounding step where the kernel sums in another order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.layers.kernels import fused_cpu
from loom.layers.norm import RMSNorm
from loom.layers.rotary import RotaryEmbedding, _apply

pytestmark = pytest.mark.skipif(fused_cpu.load() is None, reason="no C++ toolchain: the torch paths are used")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def within_one_rounding(got: torch.Tensor, want: torch.Tensor, inner: torch.Tensor | None = None) -> None:
    """One rounding of the result apart, plus one of an intermediate whose error the last op scales by `inner`."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    info = torch.finfo(want.dtype)
    bound = want.float().abs() + (0 if inner is None else inner.abs())
    assert ((got.float() - want.float()).abs() <= info.eps * bound.clamp_min(info.tiny) * 1.01).all()
    assert (got == want).float().mean() > 0.99  # ties aside, bit-identical


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_rms_norm(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 960, generator=gen) * 3).to(dtype)
    w = torch.randn(960, generator=gen).to(dtype)
    within_one_rounding(fused_cpu.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5), scaled(x, w))
    strided = torch.randn(rows, 2, 960, generator=gen).to(dtype)[:, 1]  # rows of a wider tensor
    within_one_rounding(fused_cpu.rms_norm(strided, w, 1e-6), reference_rms_norm(strided, w, 1e-6),
                        scaled(strided, w))
    norm = RMSNorm(960, 1e-5).to(dtype)
    norm.weight.data.copy_(w)
    within_one_rounding(norm(x.view(rows, 1, 960)), reference_rms_norm(x, w, 1e-5).view(rows, 1, 960),
                        scaled(x, w).view(rows, 1, 960))


def scaled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # the normalised row is rounded before the weight multiplies it: its rounding error is scaled by |w|
    return w.float() * F.rms_norm(x.float(), x.shape[-1:], None, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (96, 32), (128, 128)])
def test_rotary_equals_rotate_half(dtype, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    rope = RotaryEmbedding(head_dim, rotary_dim, 512, {"rope_type": "default", "rope_theta": 10000.0})
    qkv = torch.randn(7, 3 * 4 * head_dim, generator=gen).to(dtype)  # q is a strided slice of a fused output
    q = qkv[:, : 4 * head_dim].view(7, 4, head_dim)
    positions = torch.tensor([0, 1, 5, 100, 101, 102, 511])
    cos = rope.cos[positions].to(dtype).unsqueeze(1)
    sin = rope.sin[positions].to(dtype).unsqueeze(1)
    got = fused_cpu.rotary(q, rope.cos, rope.sin, positions, rotary_dim)
    assert torch.equal(got, _apply(q, cos, sin, rotary_dim))  # the same ops in the same order: bit-identical
    q2, k2 = rope(positions, q, q[:, :2])
    assert torch.equal(q2, got) and torch.equal(k2, got[:, :2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (96, 32)])
def test_rope_store_equals_rotary_then_store(dtype, head_dim, rotary_dim):
    """The fused attention front: q as `rotary` returns it, k rotated and v copied into exactly their slots."""
    gen = torch.Generator().manual_seed(head_dim)
    hq, hkv, rows = 6, 2, 5
    rope = RotaryEmbedding(head_dim, rotary_dim, 512, {"rope_type": "default", "rope_theta": 10000.0})
    qkv = torch.randn(rows, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype)
    positions = torch.tensor([0, 7, 100, 300, 511])
    slots = torch.tensor([3, 40, 0, 17, 63])
    cache = torch.zeros(2, 64, hkv, head_dim, dtype=dtype)
    q_ref, k, v = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    q_ref, k_ref = rope(positions, q_ref.view(rows, hq, head_dim), k.view(rows, hkv, head_dim))
    want = torch.zeros_like(cache)
    want[0, slots], want[1, slots] = k_ref, v.view(rows, hkv, head_dim)
    q = fused_cpu.rope_store(qkv, rope.cos, rope.sin, positions, rotary_dim, hq, hkv, cache, slots)
    assert torch.equal(q, q_ref) and torch.equal(cache, want)
    with pytest.raises(RuntimeError, match="slot out of range"):
        fused_cpu.rope_store(qkv, rope.cos, rope.sin, positions, rotary_dim, hq, hkv, cache, slots + 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_add_rms_norm_equals_add_then_norm(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    x, residual = ((torch.randn(rows, 960, generator=gen) * 3).to(dtype) for _ in range(2))
    w = torch.randn(960, generator=gen).to(dtype)
    before, summed = residual.clone(), residual + x
    out = fused_cpu.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(residual, summed)  # the sum, rounded as torch's add rounds it, written in place
    assert torch.equal(out, fused_cpu.rms_norm(summed, w, 1e-5))
    norm = RMSNorm(960, 1e-5).to(dtype)
    norm.weight.data.copy_(w)
    got, new_residual = norm.add_forward(x, before)  # `before` is the caller's own: it may be written into
    assert torch.equal(new_residual, summed)
    within_one_rounding(got, reference_rms_norm(summed, w, 1e-5), scaled(summed, w))


def test_paths_that_do_not_apply_fall_back():
    assert fused_cpu.rms_norm(torch.randn(2, 8), torch.randn(8).double(), 1e-6) is None  # mixed dtypes
    x = torch.randn(3, 4, 8).transpose(0, 1)  # heads not packed
    rope = RotaryEmbedding(8, 8, 16, {"rope_type": "default", "rope_theta": 10000.0})
    assert fused_cpu.rotary(x, rope.cos, rope.sin, torch.arange(4), 8) is None
    long = torch.randn(fused_cpu.ROTARY_MAX_ROWS + 1, 2, 8)  # prefill-sized: torch's vectorised ops
    assert fused_cpu.rotary(long, rope.cos, rope.sin, torch.arange(long.shape[0]) % 16, 8) is None
    cache = torch.zeros(2, 16, 1, 8)
    assert fused_cpu.rope_store(torch.randn(2, 24), rope.cos, rope.sin, torch.arange(2), 8, 1, 1, cache.bfloat16(),
                                torch.arange(2)) is None  # cache of another dtype
    assert fused_cpu.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).t().contiguous().t(), torch.randn(8), 1e-6) is None


@pytest.mark.skipif(not fused_cpu.silu_mul_supported(),
                    reason="SiLU × up is fused only on CPUs with AVX-512 BF16")
@pytest.mark.parametrize("rows", [1, 3, 16, 257])
@pytest.mark.parametrize("intermediate", [16, 37, 2560])
def test_silu_mul_equals_torch(rows, intermediate):
    gen = torch.Generator().manual_seed(rows * intermediate)
    gate_up = (torch.randn(rows, 2 * intermediate, generator=gen) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(fused_cpu.silu_mul(gate_up), F.silu(gate) * up)  # torch's rounding points, bit for bit
    # leading dims kept; a strided row view (a slice of a wider tensor) is read as it lies
    wide = torch.randn(rows, 4 * intermediate, generator=gen).bfloat16()[:, : 2 * intermediate]
    g, u = wide.chunk(2, dim=-1)
    assert torch.equal(fused_cpu.silu_mul(wide), F.silu(g) * u)
    assert fused_cpu.silu_mul(gate_up.view(1, rows, -1)).shape == (1, rows, intermediate)


def test_silu_mul_leaves_other_dtypes_to_torch():
    assert fused_cpu.silu_mul(torch.randn(2, 8)) is None
