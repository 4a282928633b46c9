"""Matrix products with bf16 weights on CPUs with AVX-512 BF16 (`vdpbf16ps`) but no AMX: AMD Zen 4/5, Intel
Cooper Lake. A small C++ kernel that replaces oneDNN's packed bf16 GEMM there.

Why not oneDNN: on these CPUs its packed bf16 GEMM reaches the arithmetic peak only for large row counts. At the
row counts of decode steps it loses half the machine (measured on the bench model's layer shapes, 2 Zen 4 cores:
at 1 row it streams the weights at ~18 GB/s of the ~35 the machine reads; at 32 rows ~275 GFLOP/s of ~440).

Layout: weights are packed once into panels of 16 output features; within a panel, k runs in pairs and each
32-bit lane holds the pair (k, k+1) of one feature, so one 64-byte load is the operand of one `vdpbf16ps`
(16 features × 2 k). Activations stay as they are: a bf16 row's (k, k+1) is one 32-bit word, broadcast straight
from memory. A micro-tile of ROWS rows × 4 panels (64 features) accumulates in ROWS × 4 registers over the
whole of k; the 4-panel weight block (≤ 330 KB at k = 2560) stays in L2 while every row tile of a block of
rows multiplies it. fp32 accumulation; the bias is added in fp32 and the result rounded once to the output
dtype (round-to-nearest-even, as torch rounds).

With the weights streamed from DRAM (32 layers of the bench model's shapes): 34 GB/s at 1 row (the machine's read
bandwidth), 323 GFLOP/s at 16 rows, 375 at 32, 429 at 256. Software prefetch of the panels' next lines was tried
and measured 1-4% slower. An fp32 input is multiplied as two bf16 parts (hi + lo).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from loom.layers.kernels.build import cpu_flags, kernel_source, load_kernel

_SOURCE = kernel_source("bf16_dot_gemm_cpu.cpp")


@cache  # asked on every matmul: decided once
def load() -> ModuleType | None:
    """The compiled kernel on an x86 CPU with AVX-512 F/BW and BF16, else None."""
    if not {"avx512f", "avx512bw", "avx512_bf16"} <= cpu_flags():
        return None
    module = load_kernel("loom_bf16_dot_gemm_cpu_v2", _SOURCE)
    return module if module is not None and module.supported() else None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 → (ceil(N/16), ceil(K/2), 16, 2) bf16 panels for `linear`."""
    module = load()
    assert module is not None
    return module.pack(weight.detach())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (..., K) fp32/bf16 → x Wᵀ + b (..., out_features) in x's dtype."""
    module = load()
    assert module is not None
    return module.linear(x, packed, bias, out_features)
