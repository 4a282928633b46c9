"""Single-token (decode) attention read straight from the paged KV cache, as a small C++ CPU kernel.

torch's path has to gather every sequence's keys and values out of the cache into a padded tensor (and cast them
to fp32, because the CPU SDPA kernel is slow in bf16 for one query) before attending: three full copies of the
context per layer and step. This kernel walks each sequence's block table instead and reads every cached key and
value exactly once, converting bf16/fp16 to fp32 in registers.

It is compiled on first use (kernels/build.py: cached per CPU under TORCH_EXTENSIONS_DIR); when no compiler is
available it reports itself unavailable and attention falls back to the torch path.
"""

from __future__ import annotations

import torch

from loom.layers.kernels.build import load_kernel

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

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

// SIMD path: a head row of D = W·V elements is V fp32 vectors of W lanes. Keys and values are widened to fp32 in
// registers, the G query heads of a KV head stay in registers, and each token costs V loads, G·V FMAs and G
// horizontal sums (the scalar loop above is ~8x slower at batch 32 × 256 context). One template, two ISAs.
#if defined(__AVX512F__)
struct Avx512 {
  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(reg a) { return _mm512_reduce_add_ps(a); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(const c10::BFloat16* p) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static reg load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, reg v) {
    __m512i bits = _mm512_castps_si512(v);  // round to nearest even, as c10::BFloat16 does (finite values)
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
  }
  static void store(c10::Half* p, reg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
};
using Simd = Avx512;
#define LOOM_DECODE_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
struct Avx2 {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load(const c10::BFloat16* p) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static reg load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, reg v) {
    alignas(32) float f[8];
    _mm256_store_ps(f, v);
    for (int i = 0; i < 8; ++i) p[i] = c10::BFloat16(f[i]);  // one row per head: not worth a vector rounding
  }
  static void store(c10::Half* p, reg v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
};
using Simd = Avx2;
#define LOOM_DECODE_SIMD 1
#endif

#ifdef LOOM_DECODE_SIMD
template <typename T, int V>
static void decode_kernel_simd(const T* q, const T* kc, const T* vc, const int32_t* bt, const int32_t* lens,
                               T* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t max_blocks, int64_t bs,
                               float scale, int64_t window) {
  using reg = typename Simd::reg;
  constexpr int64_t W = Simd::W, D = W * V;
  const int64_t G = Hq / Hkv, stride = Hkv * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<reg> qv(G * V), acc(G * V);
    const reg sc = Simd::set1(scale);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.resize(G * n);
      for (int64_t g = 0; g < G; ++g)
        for (int j = 0; j < V; ++j) qv[g * V + j] = Simd::mul(Simd::load(q + (b * Hq + h * G + g) * D + W * j), sc);
      const int32_t* table = bt + b * max_blocks;
      for (int64_t t = first; t < len; ++t) {
        const T* k = kc + ((int64_t)table[t / bs] * bs + t % bs) * stride + h * D;
        reg kv[V];
        for (int j = 0; j < V; ++j) kv[j] = Simd::load(k + W * j);
        for (int64_t g = 0; g < G; ++g) {
          reg s = Simd::mul(qv[g * V], kv[0]);
          for (int j = 1; j < V; ++j) s = Simd::fmadd(qv[g * V + j], kv[j], s);
          scores[g * n + (t - first)] = Simd::sum(s);
        }
      }
      softmax_rows(scores.data(), G, n);
      for (int64_t i = 0; i < G * V; ++i) acc[i] = Simd::zero();
      for (int64_t t = first; t < len; ++t) {
        const T* v = vc + ((int64_t)table[t / bs] * bs + t % bs) * stride + h * D;
        reg vv[V];
        for (int j = 0; j < V; ++j) vv[j] = Simd::load(v + W * j);
        for (int64_t g = 0; g < G; ++g) {
          const reg p = Simd::set1(scores[g * n + (t - first)]);
          for (int j = 0; j < V; ++j) acc[g * V + j] = Simd::fmadd(p, vv[j], acc[g * V + j]);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int j = 0; j < V; ++j) Simd::store(out + (b * Hq + h * G + g) * D + W * j, acc[g * V + j]);
    }
  });
}

// The head sizes models use, as multiples of the vector width; others take the scalar loop.
template <typename T>
static bool decode_simd(const T* q, const T* kc, const T* vc, const int32_t* bt, const int32_t* lens, T* out,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks, int64_t bs,
                        float scale, int64_t window) {
#define LOOM_CASE(d) \
  case d: if constexpr (d % Simd::W == 0) { \
    decode_kernel_simd<T, d / Simd::W>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); \
    return true; } else { return false; }
  switch (D) {
    LOOM_CASE(16) LOOM_CASE(32) LOOM_CASE(64) LOOM_CASE(80) LOOM_CASE(96) LOOM_CASE(128) LOOM_CASE(256)
    default: return false;
  }
#undef LOOM_CASE
}
#else
template <typename T>
static bool decode_simd(const T*, const T*, const T*, const int32_t*, const int32_t*, T*, int64_t, int64_t,
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
      done = decode_simd<scalar_t>(qp, kp, vp, bt, ln, op, B, Hq, Hkv, D, block_tables.size(1), block_size,
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


def load():
    """The compiled extension, or None if it cannot be built here (or LOOM_DISABLE_CPU_KERNELS=1)."""
    return load_kernel("loom_paged_decode_cpu_v7", _SOURCE, ("-ffast-math",))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, scale: float, window: int | None) -> torch.Tensor:
    """q (B, Hq, D); k/v_cache (slots, Hkv, D); block_tables (B, max_blocks) int32; lens (B,) int32."""
    module = load()
    assert module is not None
    return module.paged_decode(q.contiguous(), k_cache, v_cache, block_tables, lens, block_size, scale,
                               window if window else -1)
