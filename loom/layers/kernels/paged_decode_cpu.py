"""Single-token (decode) attention read straight from the paged KV cache, as a small C++ CPU kernel.

torch's path has to gather every sequence's keys and values out of the cache into a padded tensor (and cast them
to fp32, because the CPU SDPA kernel is slow in bf16 for one query) before attending: three full copies of the
context per layer and step. This kernel walks each sequence's block table instead and reads every cached key and
value exactly once, converting bf16/fp16 to fp32 in registers.

It is compiled on first use with torch's C++ extension loader (cached under TORCH_EXTENSIONS_DIR); when no
compiler is available it reports itself unavailable and attention falls back to the torch path.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#include <vector>
#include <limits>

template <typename T> static inline float to_f(T x) { return static_cast<float>(x); }
// bf16 → fp32 is a 16-bit shift; written out so the compiler vectorises the row conversions
template <> inline float to_f<c10::BFloat16>(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// out[b, h, :] = softmax(q[b, h] . K[ctx(b), h/G] * scale) @ V[ctx(b), h/G]
// q: (B, Hq, D); caches: (slots, Hkv, D); block_tables: (B, max_blocks) int32; lens: (B,) int32.
template <typename T>
static void decode_kernel(const T* q, const T* kc, const T* vc, const int32_t* bt, const int32_t* lens, T* out,
                          int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks, int64_t bs,
                          float scale, int64_t window) {
  const int64_t G = Hq / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores, row(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.assign(G * n, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(q[(b * Hq + h * G + g) * D + d]) * scale;
      const int32_t* table = bt + b * max_blocks;
      for (int64_t t = first; t < len; ++t) {
        const int64_t slot = (int64_t)table[t / bs] * bs + t % bs;
        const T* k = kc + (slot * Hkv + h) * D;
        float* kf = row.data();
        for (int64_t d = 0; d < D; ++d) kf[d] = to_f(k[d]);  // one conversion, shared by the G query heads
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
          #pragma omp simd reduction(+:s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * n + (t - first)] = s;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) m = std::max(m, sg[i]);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) { sg[i] = std::exp(sg[i] - m); sum += sg[i]; }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) sg[i] *= inv;
      }
      for (int64_t t = first; t < len; ++t) {
        const int64_t slot = (int64_t)table[t / bs] * bs + t % bs;
        const T* v = vc + (slot * Hkv + h) * D;
        float* vf = row.data();
        for (int64_t d = 0; d < D; ++d) vf[d] = to_f(v[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + (t - first)];
          float* a = acc.data() + g * D;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(b * Hq + h * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor lens, int64_t block_size, double scale, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  auto out = torch::empty_like(q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            block_tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
                            B, Hq, Hkv, D, block_tables.size(1), block_size, (float)scale, window);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
"""

_module = None
_failed = False
_lock = threading.Lock()


def load():
    """The compiled extension, or None if it cannot be built here (or LOOM_DISABLE_CPU_KERNELS=1)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("LOOM_DISABLE_CPU_KERNELS") == "1":
            _failed = True
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            _module = load_inline(
                "loom_paged_decode_cpu_v3", cpp_sources=[_SOURCE], extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                extra_ldflags=["-fopenmp"], verbose=False,
            )
        except Exception as err:  # noqa: BLE001 — no compiler, no headers: use the torch path
            logger.warning("CPU paged-attention kernel unavailable (%s); using the torch path", err)
            _failed = True
    return _module


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, scale: float, window: int | None) -> torch.Tensor:
    """q (B, Hq, D); k/v_cache (slots, Hkv, D); block_tables (B, max_blocks) int32; lens (B,) int32."""
    module = load()
    assert module is not None
    return module.paged_decode(q.contiguous(), k_cache, v_cache, block_tables, lens, block_size, scale,
                               window if window else -1)
