"""Fused elementwise ops for the CPU path: RMSNorm, rotary embedding and SiLU × up, each one C++ pass.

torch runs each of them as 4–10 separate ops (casts, a decomposed norm, slices, a concatenation for rotate_half, ...),
and each op costs a dispatch, an allocation and a pass over memory: at one decode token per step that overhead, not
the arithmetic, is the time (measured on the bench model, 2 Zen 3 cores: ~14 ms of a 77 ms batch-1 decode step in
these ops). These kernels compute in fp32 and round to the activation dtype at exactly the points torch's
bf16/fp16 ops do (after every op that torch would run in that dtype), so results stay those of transformers' code
up to the last bit of an occasional rounding tie.

Each function returns None when its fast path does not apply (no kernel, another device or dtype, unusual
strides); callers then run their torch code.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from loom.layers.kernels.build import kernel_source, load_kernel

_SOURCE = kernel_source("fused_cpu.cpp")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load() -> ModuleType | None:
    # no FMA contraction: torch rounds each product before the sum, and so must the kernel
    return load_kernel("loom_fused_cpu_v7", _SOURCE, ("-ffp-contract=off",))


def _usable(x: torch.Tensor) -> ModuleType | None:
    if x.device.type != "cpu" or x.dtype not in _DTYPES or torch.is_grad_enabled() and x.requires_grad:
        return None
    return load()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Llama-style RMSNorm (see RMSNorm) or None when the kernel does not apply."""
    module = _usable(x)
    if module is None or weight.dtype != x.dtype or x.stride(-1) != 1 or x.numel() == 0:
        return None
    try:
        return module.rms_norm(x, weight, eps)
    except RuntimeError:  # rows not addressable with one stride (a rare view): torch's path
        return None


# The rotary kernel converts element by element: it wins while dispatch dominates (decode steps: 22 vs 122 µs at one
# token, 61 vs 149 at 16, bench model's q), torch's vectorised ops win from ~64 tokens on (700 vs 505 µs at 256).
ROTARY_MAX_ROWS = 64


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
           rotary_dim: int) -> torch.Tensor | None:
    """NeoX-style rotary of x (T, heads, D) over its first `rotary_dim` features, or None."""
    module = _usable(x)
    if (module is None or x.dim() != 3 or x.shape[0] > ROTARY_MAX_ROWS or x.stride(2) != 1 or x.stride(1) != x.shape[2] or x.shape[0] == 0
            or cos.dtype != torch.float32 or positions.dtype != torch.int64):
        return None
    return module.rotary(x, cos, sin, positions.contiguous(), rotary_dim)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, rotary_dim: int,
               num_heads: int, num_kv_heads: int, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
    """For a fused qkv output (T, (Hq + 2 Hkv) * D): rotated q (T, Hq, D) returned, rotated k and v written into
    their slots of `cache` (2, slots, Hkv, D), in one call; None (nothing written) when the kernel does not apply.
    The values of `rotary` on q and k then `store_kv`: at one token per step the three calls, the split and the
    views cost ~30 µs per layer, the arithmetic ~1 µs."""
    module = _usable(qkv)
    if (module is None or qkv.dim() != 2 or qkv.shape[0] == 0 or qkv.shape[0] > ROTARY_MAX_ROWS
            or qkv.stride(1) != 1 or cache.dtype != qkv.dtype or not cache.is_contiguous()
            or cos.dtype != torch.float32 or positions.dtype != torch.int64 or slots.dtype != torch.int64):
        return None
    return module.rope_store(qkv, cos, sin, positions, rotary_dim, num_heads, num_kv_heads, cache[0], cache[1], slots)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`residual += x` (rounded to the dtype, in place) then the Llama RMSNorm of it, in one call; None (residual
    untouched) when the kernel does not apply."""
    module = _usable(x)
    if (module is None or weight.dtype != x.dtype or residual.dtype != x.dtype or x.shape != residual.shape
            or not x.is_contiguous() or not residual.is_contiguous() or x.numel() == 0):
        return None
    return module.add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for bf16 rows [gate | up] in one pass (AVX-512 BF16 CPUs), rounding where torch's F.silu and
    `*` round; None when the kernel does not apply. Two fewer ops per MLP: at one token per step the dispatch
    of torch's silu and mul (~20 µs per layer), not their arithmetic, was the cost."""
    module = _usable(gate_up)
    if (module is None or gate_up.dtype != torch.bfloat16 or gate_up.stride(-1) != 1 or gate_up.numel() == 0
            or gate_up.shape[-1] % 2 or not silu_mul_supported()):
        return None
    return module.silu_mul(gate_up)


@cache  # asked on every MLP: decided once
def silu_mul_supported() -> bool:
    module = load()
    return module is not None and module.silu_mul_supported()
