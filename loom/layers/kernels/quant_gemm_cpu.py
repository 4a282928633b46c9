"""Matrix products with 4- and 8-bit grouped weights (quantization/qtensor.py) on CPUs with AVX-512 BF16.

    y[m, n] = Σ_g scale[n, g] · Σ_{k ∈ g} value(code[n, k]) · x[m, k]  +  min[n, g] · Σ_{k ∈ g} x[m, k]

Why this shape: decode on a CPU streams every weight once per step, so 4-bit weights are read 4x faster than
bf16; the arithmetic must keep up with that stream. Codes are turned into bf16 *exactly* (a 4-bit code through a
32-entry `vpermw` table, which also serves NF4/FP4 codebooks; an 8-bit code through int32 → fp32 → bf16, exact
for |q| ≤ 256) and multiplied with bf16 activations by `vdpbf16ps` into a per-group fp32 sum, which the group's
fp32 scale and min fold into the output. Nothing is rounded but the activations (bf16, as in a bf16 model) and
fp32 sums, so the product equals the bf16-activation product with the exactly dequantized weight up to
summation order — no second rounding of the weights, unlike converting them to bf16.

Layout, per panel of 16 output features:
- 4-bit: (P, K/4, 32) bytes. Byte w of quad j holds feature w/2's codes for k = 4j + w%2 (low nibble) and
  k = 4j + 2 + w%2 (high nibble): one 32-byte load widens to the two bf16 operands of k-pairs 2j and 2j+1.
- 8-bit: (P, K/2, 32) int8. Byte w of pair j holds feature w/2's code for k = 2j + w%2.
- scales, mins: (P, K/G, 16) fp32.
Micro-tiles of up to 4 rows × 4 panels (fewer panels at more rows, to stay in the 32 vector registers).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

from loom.layers.kernels.build import cpu_flags, kernel_source, load_kernel

_SOURCE = kernel_source("quant_gemm_cpu.cpp")


@cache  # asked on every matmul: decided once
def load() -> ModuleType | None:
    """The compiled kernel on an x86 CPU with AVX-512 F/BW and BF16, else None."""
    if not {"avx512f", "avx512bw", "avx512_bf16"} <= cpu_flags():
        return None
    module = load_kernel("loom_quant_gemm_cpu_v5", _SOURCE)
    return module if module is not None and module.supported() else None
