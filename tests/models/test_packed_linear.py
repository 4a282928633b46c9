"""Packed bf16 weights (oneDNN's layout; Loom's AVX-512 BF16 kernel on CPUs with bf16 dot products but no AMX; Loom's
AVX2 kernel on CPUs without bf16 arithmetic): the same results as the plain matmul, through a whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom import LLM, SamplingParams
from loom.layers.kernels import bf16_dot_gemm_cpu, bf16_gemm_cpu
from loom.layers.linear import (
    ColumnParallelLinear,
    onednn_packs_bf16,
    pack_linear_weights,
    pack_weight,
    packed_linear,
    packing_kind,
)

KIND = packing_kind(torch.empty(1, 1, dtype=torch.bfloat16))
pytestmark = pytest.mark.skipif(KIND is None, reason="no packed bf16 matmul on this CPU or torch build")
avx2_kernel = pytest.mark.skipif(bf16_gemm_cpu.load() is None, reason="no AVX2/FMA or no C++ toolchain")
avx512_bf16_kernel = pytest.mark.skipif(bf16_dot_gemm_cpu.load() is None,
                                        reason="no AVX-512 BF16 or no C++ toolchain")


def close_to_fp32(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """fp32 output within fp32 summation noise of the fp32 product; bf16 output within one bf16 rounding of it."""
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == x.dtype and out.shape == ref.shape
    tol = 1e-5 * x.shape[-1] ** 0.5 * ref.abs().max() if x.dtype == torch.float32 else ref.abs() * 2**-7 + 1e-3
    assert ((out.float() - ref).abs() <= tol).all(), (out.float() - ref).abs().max()


@avx2_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 100, 197])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_avx2_kernel_matches_the_fp32_product(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    for out_features, in_features, bias in [(80, 96, True), (83, 97, False), (7, 33, True), (1600, 960, False)]:
        w = torch.randn(out_features, in_features, generator=gen).bfloat16()
        b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        packed = pack_weight(w, "avx2_bf16")
        close_to_fp32(packed_linear(x, packed, b), x, w, b)
        if rows == 6:  # leading dims are kept
            y = packed_linear(x.view(2, 3, in_features), packed, b)
            assert y.shape == (2, 3, out_features) and torch.equal(y.view(6, -1), packed_linear(x, packed, b))


@avx2_kernel
def test_avx2_kernel_takes_no_rows():
    packed = pack_weight(torch.randn(20, 8).bfloat16(), "avx2_bf16")
    assert packed_linear(torch.empty(0, 8).bfloat16(), packed, None).shape == (0, 20)


@avx512_bf16_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 100, 197])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_avx512_bf16_kernel_matches_the_fp32_product(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    # odd k (a padded pair), features that fill no panel / no panel group, a panel group and a half, bias or not
    for out_features, in_features, bias in [(80, 96, True), (83, 97, False), (7, 33, True), (1600, 960, False),
                                            (100, 64, True)]:
        w = torch.randn(out_features, in_features, generator=gen).bfloat16()
        b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        packed = pack_weight(w, "avx512_bf16")
        close_to_fp32(packed_linear(x, packed, b), x, w, b)
        # a strided view (every other row) is read as it is
        wide = torch.randn(rows, 2 * in_features, generator=gen).to(dtype)[:, :in_features]
        close_to_fp32(packed_linear(wide, packed, b), wide, w, b)
        if rows == 6:  # leading dims are kept
            y = packed_linear(x.view(2, 3, in_features), packed, b)
            assert y.shape == (2, 3, out_features) and torch.equal(y.view(6, -1), packed_linear(x, packed, b))


@avx512_bf16_kernel
def test_avx512_bf16_kernel_takes_no_rows():
    packed = pack_weight(torch.randn(20, 8).bfloat16(), "avx512_bf16")
    assert packed_linear(torch.empty(0, 8).bfloat16(), packed, None).shape == (0, 20)


@pytest.mark.skipif(not onednn_packs_bf16(),
                    reason="oneDNN packs bf16 only on CPUs with AVX-512 BW/VL/DQ or AVX-NE-CONVERT")
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_onednn_packed_matmul_equals_plain(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    w = torch.randn(80, 96, generator=gen).bfloat16()
    b = torch.randn(80, generator=gen).bfloat16()
    assert torch.equal(packed_linear(x, pack_weight(w, "onednn"), b), F.linear(x, w, b))


def test_packing_releases_the_plain_weight():
    layer = ColumnParallelLinear(32, [16, 16]).bfloat16()
    torch.nn.init.normal_(layer.weight)
    weight = layer.weight.detach().clone()
    x = torch.randn(3, 32).bfloat16()
    assert pack_linear_weights(layer) == 1 and layer.weight.numel() == 0
    assert layer._packed is not None and layer._packed.kind == KIND
    close_to_fp32(layer(x), x, weight, None)
    assert pack_linear_weights(layer) == 0  # idempotent
    fp32 = ColumnParallelLinear(32, [16])
    assert pack_linear_weights(fp32) == 0  # only bf16 is packed: fp32 keeps MKL's GEMM


def test_bf16_model_generates_the_same_tokens_packed_or_not(llama_dir, monkeypatch):
    prompts = ["Hello there", "The quick brown fox jumps"]
    params = SamplingParams(max_new_tokens=12)
    packed = LLM(llama_dir, dtype="bfloat16")
    assert packed.engine.runner.model.lm_head._packed is not None
    with_packing = [r.token_ids for r in packed.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setenv("LOOM_DISABLE_PACKED_LINEAR", "1")
    plain = LLM(llama_dir, dtype="bfloat16")
    assert plain.engine.runner.model.lm_head._packed is None
    assert [r.token_ids for r in plain.generate(prompts, params, use_tqdm=False)] == with_packing
