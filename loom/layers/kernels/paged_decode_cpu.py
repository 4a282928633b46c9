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
#include <type_traits>

// In place: each of the `rows` rows of `n` scores becomes its softmax.
static inline void softmax_rows(float* scores, int64_t rows, int64_t n) {
  for (int64_t g = 0; g < rows; ++g) {
    float* sg = scores + g * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, sg[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) { sg[i] = std::exp(sg[i] - m); sum += sg[i]; }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < n; ++i) sg[i] *= inv;
  }
}

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
      softmax_rows(scores.data(), G, n);
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

#if defined(__AVX512F__)
#include <immintrin.h>
// AVX-512 path: a head row of D = 16·V elements is V fp32 vectors. Keys and values are widened to fp32 in
// registers, the G query heads of a KV head stay in registers, and each token costs V loads, G·V FMAs and G
// horizontal sums (the scalar loop above is ~8x slower at batch 32 × 256 context).
template <typename T> static inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
template <> inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <typename T> static inline void store16(T* p, __m512 v);
template <> inline void store16<float>(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
template <> inline void store16<c10::BFloat16>(c10::BFloat16* p, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);  // round to nearest even, as c10::BFloat16 does (finite values)
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
template <> inline void store16<c10::Half>(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename T, int V>
static void decode_kernel_avx512(const T* q, const T* kc, const T* vc, const int32_t* bt, const int32_t* lens,
                                 T* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t max_blocks, int64_t bs,
                                 float scale, int64_t window) {
  constexpr int64_t D = 16 * V;
  const int64_t G = Hq / Hkv, stride = Hkv * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<__m512> qv(G * V), acc(G * V);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.resize(G * n);
      for (int64_t g = 0; g < G; ++g)
        for (int j = 0; j < V; ++j) qv[g * V + j] = _mm512_mul_ps(load16(q + (b * Hq + h * G + g) * D + 16 * j), sc);
      const int32_t* table = bt + b * max_blocks;
      for (int64_t t = first; t < len; ++t) {
        const T* k = kc + ((int64_t)table[t / bs] * bs + t % bs) * stride + h * D;
        __m512 kv[V];
        for (int j = 0; j < V; ++j) kv[j] = load16(k + 16 * j);
        for (int64_t g = 0; g < G; ++g) {
          __m512 s = _mm512_mul_ps(qv[g * V], kv[0]);
          for (int j = 1; j < V; ++j) s = _mm512_fmadd_ps(qv[g * V + j], kv[j], s);
          scores[g * n + (t - first)] = _mm512_reduce_add_ps(s);
        }
      }
      softmax_rows(scores.data(), G, n);
      for (int64_t i = 0; i < G * V; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t t = first; t < len; ++t) {
        const T* v = vc + ((int64_t)table[t / bs] * bs + t % bs) * stride + h * D;
        __m512 vv[V];
        for (int j = 0; j < V; ++j) vv[j] = load16(v + 16 * j);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(scores[g * n + (t - first)]);
          for (int j = 0; j < V; ++j) acc[g * V + j] = _mm512_fmadd_ps(p, vv[j], acc[g * V + j]);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int j = 0; j < V; ++j) store16(out + (b * Hq + h * G + g) * D + 16 * j, acc[g * V + j]);
    }
  });
}

template <typename T>
static bool decode_avx512(const T* q, const T* kc, const T* vc, const int32_t* bt, const int32_t* lens, T* out,
                          int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks, int64_t bs,
                          float scale, int64_t window) {
  switch (D) {
    case 16: decode_kernel_avx512<T, 1>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
    case 32: decode_kernel_avx512<T, 2>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
    case 64: decode_kernel_avx512<T, 4>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
    case 80: decode_kernel_avx512<T, 5>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
    case 96: decode_kernel_avx512<T, 6>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
    case 128: decode_kernel_avx512<T, 8>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
    case 256: decode_kernel_avx512<T, 16>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
    default: return false;
  }
}
#else
template <typename T>
static bool decode_avx512(const T*, const T*, const T*, const int32_t*, const int32_t*, T*, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, float, int64_t) { return false; }
#endif

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor lens, int64_t block_size, double scale, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  auto out = torch::empty_like(q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k_cache.data_ptr<scalar_t>(), *vp = v_cache.data_ptr<scalar_t>();
    const int32_t *bt = block_tables.data_ptr<int32_t>(), *ln = lens.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    bool done = false;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      done = decode_avx512<scalar_t>(qp, kp, vp, bt, ln, op, B, Hq, Hkv, D, block_tables.size(1), block_size,
                                     (float)scale, window);
    }
    if (!done)
      decode_kernel<scalar_t>(qp, kp, vp, bt, ln, op, B, Hq, Hkv, D, block_tables.size(1), block_size, (float)scale,
                              window);
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
                "loom_paged_decode_cpu_v5", cpp_sources=[_SOURCE], extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
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
