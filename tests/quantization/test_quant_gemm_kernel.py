"""The two quantized-weight kernels against references computed with torch from the dequantized weight:
- bf16 products (kernels/quant_gemm_cpu.py): bf16 activations times the exact weight, fp32 sums, one final rounding;
- VNNI (kernels/quant_vnni_gemm_cpu.py): activations rounded to int8 per block of 32 with an absmax scale (as
  llama.cpp's Q8 activations), times the exact weight; the min term from the exact activation sums."""

from __future__ import annotations

import pytest
import torch

from loom.layers.kernels import quant_gemm_cpu, quant_vnni_gemm_cpu
from loom.quantization.cpu_weight import VNNI_4, VNNI_8, code_table, pack_quantized
from loom.quantization.qtensor import QuantizedTensor

pytestmark = pytest.mark.skipif(quant_gemm_cpu.load() is None, reason="needs a CPU with AVX-512 BF16")
needs_vnni = pytest.mark.skipif(quant_vnni_gemm_cpu.load() is None, reason="needs a CPU with AVX-512 VNNI")


@pytest.fixture
def bf16_kernel(monkeypatch):
    monkeypatch.delenv("LOOM_QUANT_KERNEL", raising=False)  # the default


@pytest.fixture
def vnni_kernel(monkeypatch):
    monkeypatch.setenv("LOOM_QUANT_KERNEL", "vnni")


def _int8_activations(x: torch.Tensor, group: int, kstep: int) -> torch.Tensor:
    """x rounded as the VNNI kernel rounds it: blocks of 32 (or the largest multiple of the k-step dividing the
    group), scale absmax / 127, q = round-half-even(x · (1 / scale))."""
    block = min(group, 32)
    while group % block or block % kstep:
        block -= kstep
    xb = x.float().view(x.shape[0], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).view_as(x.float())

NF4_LIKE = torch.tensor([-1.0, -0.6875, -0.5234375, -0.39453125, -0.28515625, -0.18359375, -0.08984375, 0.0,
                         0.07958984375, 0.16015625, 0.24609375, 0.337890625, 0.4375, 0.5625, 0.72265625, 1.0])


def _weight(n: int, k: int, bits: int, group: int, mins: bool, codebook: torch.Tensor | None, seed: int,
            half: bool = False):
    gen = torch.Generator().manual_seed(seed)
    codes = (torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8) if bits == 4
             else torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8))
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3
    offsets = torch.randn(n, k // group, generator=gen) * 0.05 if mins else None
    if half:  # exactly fp16 numbers, as GGUF's are: stored as fp16 by the packer
        scales = scales.half().float()
        offsets = None if offsets is None else offsets.half().float()
    return QuantizedTensor(codes, scales, offsets, bits, group, codebook=codebook)


@pytest.mark.parametrize("bits,group,mins,codebook", [
    (4, 32, True, None), (4, 32, False, torch.arange(16.0) - 8), (4, 128, True, None), (4, 16, False, NF4_LIKE),
    (8, 32, False, None), (8, 16, True, None), (8, 320, False, None),
])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 70])
@pytest.mark.parametrize("half", [False, True])
def test_matches_exact_reference(bits, group, mins, codebook, rows, half, bf16_kernel):
    n, k = 72, 640  # 72 features: the last panel is partial, the last group of 4 panels too
    qt = _weight(n, k, bits, group, mins, codebook, seed=rows, half=half)
    packed = pack_quantized(qt)
    x = torch.randn(rows, k).bfloat16()
    bias = torch.randn(n)
    assert packed.scales.dtype == (torch.float16 if half else torch.float32)
    got = packed.matmul(x, bias)
    expected = x.float() @ qt.dequantize().T + bias
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # only the final rounding to bf16 (and fp32 summation order) separates them
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -7, atol=1e-3 * expected.abs().max().item())


@needs_vnni
@pytest.mark.parametrize("bits,group,mins,codebook", [
    (4, 32, True, None), (4, 32, False, torch.arange(16.0) - 8), (4, 128, True, None), (4, 64, False, None),
    (8, 32, False, None), (8, 16, True, None), (8, 320, False, None), (8, 640, True, None),
])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 70])
def test_vnni_matches_int8_activation_reference(bits, group, mins, codebook, rows, vnni_kernel):
    n, k = 72, 640
    qt = _weight(n, k, bits, group, mins, codebook, seed=rows, half=True)
    packed = pack_quantized(qt)
    assert packed.mode == (VNNI_4 if bits == 4 else VNNI_8)
    x = torch.randn(rows, k).bfloat16()
    bias = torch.randn(n)
    got = packed.matmul(x, bias)
    scaled = qt.values().unflatten(1, (-1, group)) * qt.scales.unsqueeze(-1)  # the weight without its mins
    expected = _int8_activations(x, group, 8 if bits == 4 else 4) @ scaled.flatten(1).T + bias
    if qt.mins is not None:
        expected += x.float().view(rows, -1, group).sum(-1) @ qt.mins.T
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -7, atol=1e-3 * expected.abs().max().item())


def test_leading_dimensions_and_empty_input(bf16_kernel):
    qt = _weight(32, 64, 4, 32, True, None, seed=0)
    packed = pack_quantized(qt)
    x = torch.randn(2, 3, 64).bfloat16()
    torch.testing.assert_close(packed.matmul(x, None).float(), (x.float() @ qt.dequantize().T),
                               rtol=2 ** -7, atol=1e-3)
    assert packed.matmul(torch.empty(0, 64, dtype=torch.bfloat16), None).shape == (0, 32)


def test_code_table_refuses_values_bf16_cannot_hold():
    book = NF4_LIKE.clone()
    book[3] = 0.1  # not a bf16 number
    assert code_table(_weight(16, 32, 4, 32, False, book, seed=0)) is None
    assert code_table(_weight(16, 32, 4, 32, False, NF4_LIKE, seed=0)) is not None
