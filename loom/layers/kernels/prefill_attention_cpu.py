"""Causal attention for prompt chunks on CPUs with AVX-512 BF16, read from the paged KV cache: a small C++ kernel.

torch's CPU SDPA (flash) kernel in bf16 runs a 256-token prompt at ~50-100 GFLOP/s on the bench model's heads
(2.4 ms per layer and prompt on 2 Zen 4 cores, 17% of a prefill step), and a chunk that continues a prompt first
has to gather its keys and values out of the cache. This kernel is FlashAttention's loop with `vdpbf16ps`:

- once per call, each KV head's keys are packed per block of 16 keys as (d pairs × 16 keys × 2) and its values as
  (key pairs × D × 2), straight from the cache slots, so that both products are bf16 dot products whose second
  operand is one 64-byte load;
- a work item is a KV head and 16 query positions (its G query heads: G × 16 rows); for each block of 64 keys up to
  the causal limit, scores for 4 rows × 4 sub-blocks of 16 keys at a time, an online softmax (running max and sum
  per row, paid once per 64 keys; FlashAttention rounds the probabilities to bf16 for the second product, and so
  does this), then probabilities × values into fp32 row sums (even and odd key pairs in separate chains).

Measured (bench model heads, 2 Zen 4 cores): 1.26 ms per 256-token prompt and layer (SDPA flash: 2.5 ms; this
kernel with a softmax per 16 keys: 1.92 ms), 3.65 ms at 512 tokens (6.0 with 16-key blocks).

Sliding windows (keys with q - k < window) are supported; logit soft-capping is not (Gemma 2 keeps its own path).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from loom.layers.kernels.build import cpu_flags, kernel_source, load_kernel

_SOURCE = kernel_source("prefill_attention_cpu.cpp")


@cache
def load() -> ModuleType | None:
    """The compiled kernel on an x86 CPU with AVX-512 F/BW and BF16, else None."""
    if not {"avx512f", "avx512bw", "avx512_bf16"} <= cpu_flags():
        return None
    module = load_kernel("loom_prefill_attention_cpu_v3", _SOURCE)
    return module if module is not None and module.supported() else None


def applies(q: torch.Tensor, head_dim: int, softcap: float | None) -> bool:
    """Whether the kernel serves this layer's prompt chunks (bf16 on a CPU that has it, head size a multiple of 32
    up to 256, no soft-capping)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and softcap is None and head_dim % 32 == 0
            and head_dim <= 256 and load() is not None)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      q_start: int, scale: float, window: int | None) -> torch.Tensor:
    """q (Lq, Hq, D) at positions q_start.., keys/values of positions 0..q_start+Lq-1 in the caches at `slots`."""
    module = load()
    assert module is not None
    return module.prefill_attention(q.contiguous(), k_cache, v_cache, slots, q_start, scale, window or -1)
