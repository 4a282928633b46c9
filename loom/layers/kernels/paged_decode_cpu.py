"""Single-token (decode) attention read straight from the paged KV cache, as a small C++ CPU kernel.

torch's path has to gather every sequence's keys and values out of the cache into a padded tensor (and cast them
to fp32, because the CPU SDPA kernel is slow in bf16 for one query) before attending: three full copies of the
context per layer and step. This kernel walks each sequence's block table instead and reads every cached key and
value exactly once, converting bf16/fp16 to fp32 in registers. On CPUs with AVX-512 BF16, bf16 caches take a
path of bf16 dot products for q . k, 16 tokens at a time (1.5-1.7x the generic path with the cache in L3 at batch
32 × 256-384 context, 7% from DRAM, where reading the cache bounds it; Zen 4, 2 cores).

It is compiled on first use (kernels/build.py: cached per CPU under TORCH_EXTENSIONS_DIR); when no compiler is
available it reports itself unavailable and attention falls back to the torch path.
"""

from __future__ import annotations

import torch

from loom.layers.kernels.build import kernel_source, load_kernel

_SOURCE = kernel_source("paged_decode_cpu.cpp")


def load():
    """The compiled extension, or None if it cannot be built here (or LOOM_DISABLE_CPU_KERNELS=1)."""
    return load_kernel("loom_paged_decode_cpu_v16", _SOURCE, ("-ffast-math",))


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, scale: float, window: int | None) -> torch.Tensor:
    """q (B, Hq, D); k/v_cache (slots, Hkv, D) in q's dtype or fp8 (float8_e4m3fn / float8_e5m2: the output is
    in q's dtype); block_tables (B, max_blocks) int32; lens (B,) int32."""
    module = load()
    assert module is not None
    kernel = module.paged_decode_fp8 if k_cache.dtype in FP8_DTYPES else module.paged_decode
    return kernel(q.contiguous(), k_cache, v_cache, block_tables, lens, block_size, scale, window if window else -1)


def store_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Write this step's keys and values into their slots of `cache` (2, slots, Hkv, D) in one call; False (nothing
    written) when the kernel does not apply, and the caller uses index_copy_."""
    module = load()
    if (module is None or cache.device.type != "cpu" or k.dtype != cache.dtype or v.dtype != cache.dtype
            or slot_mapping.dtype != torch.int64 or k.dim() != 3 or v.dim() != 3 or not cache.is_contiguous()
            or k.stride(2) != 1 or k.stride(1) != k.shape[2] or v.stride(2) != 1 or v.stride(1) != v.shape[2]):
        return False
    module.store_kv(cache[0], cache[1], slot_mapping, k, v)
    return True
