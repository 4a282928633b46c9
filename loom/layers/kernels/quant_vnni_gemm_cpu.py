"""Matrix products with 4- and 8-bit integer-valued grouped weights over int8 activations, on CPUs with AVX-512
VNNI (`vpdpbusd`: 64 byte products per instruction): AMD Zen 4/5, Intel Ice Lake and later. llama.cpp's scheme.

    y[m, n] = Σ_g scale[n, g] · Σ_b s_x[m, b] · Σ_{k ∈ b} (u[n, k] − off) · q_x[m, k]  +  min[n, g] · Σ_{k ∈ g} x[m, k]

Activations are quantized per row in blocks of 32 (16 for groups of 16) to int8 with an absmax scale s_x, as
llama.cpp's Q8 activations are. Weights are unsigned codes u (4-bit nibbles, or the 8-bit code + 128) whose value is
u − off; `vpdpbusd` sums u · q_x in int32 and the block's Σ q_x (computed with the activations) takes the offset
off exactly, in integers. Only the activations' int8 rounding and the fp32 folds round; the weights are the
checkpoint's. Why not bf16 products (kernels/quant_gemm_cpu.py, kept for code-book formats): a bf16 dot product
takes 32 products per instruction and every code must first become a bf16; here 64 per instruction and a nibble
needs only a mask, so a decode step of 16 rows costs about half.

Layout per panel of 16 output features, 4 panels interleaved per stream: 4-bit (P/4, K/8, 4, 64) bytes, byte
4f + i of a step holding feature f's codes at k = 8t + i (low nibble) and 8t + 4 + i (high); 8-bit (P/4, K/4, 4, 64),
byte 4f + i = code at k = 4t + i, plus 128. Scales and mins (P/4, G, 4, 16), fp16 where exact, else fp32.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

from loom.layers.kernels.build import cpu_flags, kernel_source, load_kernel

_SOURCE = kernel_source("quant_vnni_gemm_cpu.cpp")


@cache  # asked on every matmul: decided once
def load() -> ModuleType | None:
    """The compiled kernel on an x86 CPU with AVX-512 F/BW and VNNI, else None."""
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags():
        return None
    module = load_kernel("loom_quant_vnni_gemm_cpu_v3", _SOURCE)
    return module if module is not None and module.supported() else None
