"""Matrix products with bf16 weights on CPUs that have AVX2 and FMA but no bf16 arithmetic (AMD Zen 2/3, Intel
before Cooper Lake), as a small C++ kernel.

There, neither oneDNN (which packs bf16 only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT) nor torch's bf16 GEMM has a
fast path: `F.linear` in bf16 runs one matrix-vector product per row (measured on the bench model's layer shapes,
2 Zen 3 cores: 1.1 ms per layer at 1 row, 18.6 ms at 16, 283 ms at 256), and upcasting the weights to fp32 for
every call costs a full weight copy per layer. This kernel keeps the weights in bf16 (half the bytes to stream at
batch 1) and widens them to fp32 in registers inside the multiply: weights are packed once into panels of 16
output features × K, two features per 32-bit lane, so one shift and one mask turn 16 packed bf16 into two fp32
vectors; activations are packed into 6-row tiles and each 6 × 16 output tile accumulates in 12 registers. fp32
accumulation as in torch's bf16 matmul, one rounding at the end (bias added in fp32 first).

Measured on those shapes and 2 threads: 0.4 ms per layer at 1 row (weight-bandwidth bound), 2.4–3.0 ms at 16,
36–44 ms at 256 (115–140 GFLOP/s, as fast as oneDNN's fp32 GEMM with twice-as-large weights).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from loom.layers.kernels.build import cpu_flags, kernel_source, load_kernel

_SOURCE = kernel_source("bf16_gemm_cpu.cpp")


@cache  # asked on every matmul: decided once
def load() -> ModuleType | None:
    """The compiled kernel on an x86 CPU with AVX2 and FMA, else None."""
    if not {"avx2", "fma"} <= cpu_flags():
        return None
    module = load_kernel("loom_bf16_gemm_cpu_v3", _SOURCE)
    return module if module is not None and module.supported() else None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 → (ceil(N/16), K, 16) bf16 panels for `linear`."""
    module = load()
    assert module is not None
    return module.pack(weight.detach())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (..., K) fp32/bf16 → x Wᵀ + b (..., out_features) in x's dtype."""
    module = load()
    assert module is not None
    return module.linear(x, packed, bias, out_features)
