#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
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

// fp8 caches (--kv-cache-dtype): every byte's value, once, so that a vector of cached bytes widens to fp32 with one
// gather (there is no e4m3 → fp32 instruction; e5m2 could go through fp16, but one path serves both formats).
template <typename C> static const float* fp8_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(C(static_cast<uint8_t>(i), C::from_bits()));
    return t;
  }();
  return table.data();
}
template <> inline float to_f<c10::Float8_e4m3fn>(c10::Float8_e4m3fn x) { return fp8_table<c10::Float8_e4m3fn>()[x.x]; }
template <> inline float to_f<c10::Float8_e5m2>(c10::Float8_e5m2 x) { return fp8_table<c10::Float8_e5m2>()[x.x]; }

// out[b, h, :] = softmax(q[b, h] . K[ctx(b), h/G] * scale) @ V[ctx(b), h/G]
// q: (B, Hq, D); caches: (slots, Hkv, D) of T, or of fp8 (C); block_tables: (B, max_blocks) int32; lens: (B,) int32.
template <typename T, typename C = T>
static void decode_kernel(const T* q, const C* kc, const C* vc, const int32_t* bt, const int32_t* lens, T* out,
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
        const C* k = kc + (slot * Hkv + h) * D;
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
        const C* v = vc + (slot * Hkv + h) * D;
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
  template <typename C> static reg load_fp8(const C* p) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_i32gather_ps(idx, fp8_table<C>(), 4);
  }
  static reg load(const c10::Float8_e4m3fn* p) { return load_fp8(p); }
  static reg load(const c10::Float8_e5m2* p) { return load_fp8(p); }
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
  template <typename C> static reg load_fp8(const C* p) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_i32gather_ps(fp8_table<C>(), idx, 4);
  }
  static reg load(const c10::Float8_e4m3fn* p) { return load_fp8(p); }
  static reg load(const c10::Float8_e5m2* p) { return load_fp8(p); }
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
template <typename T, typename C, int V>
static void decode_kernel_simd(const T* q, const C* kc, const C* vc, const int32_t* bt, const int32_t* lens,
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
        const C* k = kc + ((int64_t)table[t / bs] * bs + t % bs) * stride + h * D;
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
        const C* v = vc + ((int64_t)table[t / bs] * bs + t % bs) * stride + h * D;
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

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 caches on CPUs with `vdpbf16ps`: q . k for 16 tokens at a time as bf16 dot products (products exact in
// fp32, no widening of the keys), the 16 partial-sum vectors folded into one vector of 16 scores by a transpose
// tree (15 adds instead of 16 horizontal sums), softmax vectorised, values widened in registers. ~3x fewer
// instructions per cached token than the generic SIMD path.
#define LOOM_DECODE_BF16_DOT 1

// lane i of the result = sum of the 16 lanes of s[i]
static inline __m512 fold16(const __m512* s) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_ps(s[2 * i], s[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xdd));
}

#include "simd_math.h"  // exp512: e^x, clamped to [-87, 88] (callers mask lanes that should be 0)

static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

static inline void softmax_row_avx512(float* s, int64_t n) {
  __m512 mx = _mm512_set1_ps(-3.0e38f);
  for (int64_t i = 0; i < n; i += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-3.0e38f), tail_mask(n - i), s + i));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m)));
    _mm512_mask_storeu_ps(s + i, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(s + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i), inv));
  }
}

static inline __m512 widen_lo(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(x)), 16)); }
static inline __m512 widen_hi(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1)), 16)); }

// Query heads whose D-wide sums fit in 16 registers at once (at least one).
template <int DP> inline constexpr int PV_HEADS = 8 / DP > 0 ? (8 / DP > 4 ? 4 : 8 / DP) : 1;

// out[g] = sum_t p[g][t] v[t] for GH query heads, the sums held in registers (GH x 2DP vectors) over all tokens.
template <int DP, int GH>
static inline void pv_pass(const float* p, int64_t npad, const c10::BFloat16* vh, int64_t stride, const int32_t* table,
                           int64_t bs, int64_t first, int64_t len, c10::BFloat16* out) {
  constexpr int64_t D = 32 * DP;
  __m512 acc[GH][2 * DP];
  for (int g = 0; g < GH; ++g)
    for (int j = 0; j < 2 * DP; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t t = first; t < len; ++t) {
    const c10::BFloat16* v = vh + ((int64_t)table[t / bs] * bs + t % bs) * stride;
    __m512 vf[2 * DP];
    for (int j = 0; j < DP; ++j) {
      const __m512i raw = _mm512_loadu_si512(reinterpret_cast<const void*>(v + 32 * j));
      vf[2 * j] = widen_lo(raw);
      vf[2 * j + 1] = widen_hi(raw);
    }
    for (int g = 0; g < GH; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * npad + (t - first)]);
      for (int j = 0; j < 2 * DP; ++j) acc[g][j] = _mm512_fmadd_ps(pg, vf[j], acc[g][j]);
    }
  }
  for (int g = 0; g < GH; ++g)
    for (int j = 0; j < 2 * DP; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * D + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[g][j]));
}

// DP: head size / 32 (bf16 elements per 512-bit vector); one work item per sequence and KV head. (Measured and
// dropped: items of a whole sequence reading each token's heads together, software prefetch of the next blocks,
// p . v as bf16 dot products over token pairs: none was faster with the cache in DRAM.)
template <int DP>
static void decode_bf16_dot(const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc,
                            const int32_t* bt, const int32_t* lens, c10::BFloat16* out, int64_t B, int64_t Hq,
                            int64_t Hkv, int64_t max_blocks, int64_t bs, float scale, int64_t window) {
  constexpr int64_t D = 32 * DP;
  constexpr int GHM = PV_HEADS<DP>;
  const int64_t G = Hq / Hkv, stride = Hkv * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<__m512i> qv(G * DP);
    const __m512 sc = _mm512_set1_ps(scale);
    const c10::BFloat16* rows[16];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first, npad = (n + 15) / 16 * 16;
      scores.resize(G * npad);
      for (int64_t g = 0; g < G; ++g)
        for (int j = 0; j < DP; ++j)
          qv[g * DP + j] = _mm512_loadu_si512(reinterpret_cast<const void*>(q + (b * Hq + h * G + g) * D + 32 * j));
      const int32_t* table = bt + b * max_blocks;
      for (int64_t t0 = first; t0 < len; t0 += 16) {
        const int64_t cnt = std::min<int64_t>(16, len - t0);
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t t = t0 + (i < cnt ? i : 0);
          rows[i] = kc + ((int64_t)table[t / bs] * bs + t % bs) * stride + h * D;
        }
        for (int64_t g = 0; g < G; ++g) {
          __m512 part[16];
          for (int i = 0; i < 16; ++i) {
            __m512 a = _mm512_setzero_ps();
            for (int j = 0; j < DP; ++j)
              a = _mm512_dpbf16_ps(a, (__m512bh)qv[g * DP + j],
                                   (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(rows[i] + 32 * j)));
            part[i] = a;
          }
          _mm512_storeu_ps(scores.data() + g * npad + (t0 - first), _mm512_mul_ps(fold16(part), sc));
        }
      }
      for (int64_t g = 0; g < G; ++g) softmax_row_avx512(scores.data() + g * npad, n);
      c10::BFloat16* o = out + (b * Hq + h * G) * D;
      const c10::BFloat16* vh = vc + h * D;
      for (int64_t g0 = 0; g0 < G; g0 += GHM) {
        const float* p = scores.data() + g0 * npad;
        switch (std::min<int64_t>(GHM, G - g0)) {
          case 1: pv_pass<DP, 1>(p, npad, vh, stride, table, bs, first, len, o + g0 * D); break;
          case 2: pv_pass<DP, 2>(p, npad, vh, stride, table, bs, first, len, o + g0 * D); break;
          case 3: pv_pass<DP, 3>(p, npad, vh, stride, table, bs, first, len, o + g0 * D); break;
          default: pv_pass<DP, GHM>(p, npad, vh, stride, table, bs, first, len, o + g0 * D);
        }
      }
    }
  });
}

// Other dtypes: false (the generic path runs).
template <typename T>
static bool decode_bf16(const T* q, const T* kc, const T* vc, const int32_t* bt, const int32_t* lens, T* out,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks, int64_t bs, float scale,
                        int64_t window) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    switch (D) {
      case 64: decode_bf16_dot<2>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
      case 96: decode_bf16_dot<3>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
      case 128: decode_bf16_dot<4>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
      case 256: decode_bf16_dot<8>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); return true;
      default: return false;
    }
  }
  return false;
}
#endif

// The head sizes models use, as multiples of the vector width; others take the scalar loop.
template <typename T, typename C = T>
static bool decode_simd(const T* q, const C* kc, const C* vc, const int32_t* bt, const int32_t* lens, T* out,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks, int64_t bs,
                        float scale, int64_t window) {
#define LOOM_CASE(d) \
  case d: if constexpr (d % Simd::W == 0) { \
    decode_kernel_simd<T, C, d / Simd::W>(q, kc, vc, bt, lens, out, B, Hq, Hkv, max_blocks, bs, scale, window); \
    return true; } else { return false; }
  switch (D) {
    LOOM_CASE(16) LOOM_CASE(32) LOOM_CASE(64) LOOM_CASE(80) LOOM_CASE(96) LOOM_CASE(128) LOOM_CASE(256)
    default: return false;
  }
#undef LOOM_CASE
}
#else
template <typename T, typename C = T>
static bool decode_simd(const T*, const C*, const C*, const int32_t*, const int32_t*, T*, int64_t, int64_t,
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
#ifdef LOOM_DECODE_BF16_DOT
    done = decode_bf16<scalar_t>(qp, kp, vp, bt, ln, op, B, Hq, Hkv, D, block_tables.size(1), block_size,
                                 (float)scale, window);
#endif
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (!done)
        done = decode_simd<scalar_t>(qp, kp, vp, bt, ln, op, B, Hq, Hkv, D, block_tables.size(1), block_size,
                                     (float)scale, window);
    }
    if (!done)
      decode_kernel<scalar_t>(qp, kp, vp, bt, ln, op, B, Hq, Hkv, D, block_tables.size(1), block_size, (float)scale,
                              window);
  });
  return out;
}

// The same attention over an fp8 cache (--kv-cache-dtype fp8_e4m3fn | fp8_e5m2, stored unscaled): q and the output
// in the activation dtype, each cached key/value widened to fp32 as it is read.
torch::Tensor paged_decode_fp8(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor lens, int64_t block_size, double scale,
                               int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode_fp8: key and value caches differ");
  auto out = torch::empty_like(q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), mb = block_tables.size(1);
  const int32_t *bt = block_tables.data_ptr<int32_t>(), *ln = lens.data_ptr<int32_t>();
  auto run = [&](auto cache_tag) {
    using C = decltype(cache_tag);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_fp8", [&] {
      const scalar_t* qp = q.data_ptr<scalar_t>();
      const C *kp = reinterpret_cast<const C*>(k_cache.data_ptr()), *vp = reinterpret_cast<const C*>(v_cache.data_ptr());
      scalar_t* op = out.data_ptr<scalar_t>();
      bool done = false;
      if constexpr (!std::is_same_v<scalar_t, double>)
        done = decode_simd<scalar_t, C>(qp, kp, vp, bt, ln, op, B, Hq, Hkv, D, mb, block_size, (float)scale, window);
      if (!done)
        decode_kernel<scalar_t, C>(qp, kp, vp, bt, ln, op, B, Hq, Hkv, D, mb, block_size, (float)scale, window);
    });
  };
  if (k_cache.scalar_type() == at::kFloat8_e4m3fn) run(c10::Float8_e4m3fn());
  else if (k_cache.scalar_type() == at::kFloat8_e5m2) run(c10::Float8_e5m2());
  else TORCH_CHECK(false, "paged_decode_fp8: the caches are not fp8");
  return out;
}

// caches (slots, Hkv, D) contiguous; k, v (T, Hkv, D), each row's heads contiguous; slots (T,) int64: row t of k and
// v into slot slots[t] of each cache (both caches in one call, no temporaries: torch's two index_copy_ calls cost
// ~9 µs each per layer at one token per step).
void store_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.scalar_type() == at::kLong, "store_kv");
  const int64_t T = k.size(0), row = k_cache.size(1) * k_cache.size(2), elem = k_cache.element_size();
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2) &&
              k.size(1) * k.size(2) == row && v.size(1) * v.size(2) == row && slots.size(0) == T, "store_kv shapes");
  const int64_t* sp = slots.data_ptr<int64_t>();
  char *kc = static_cast<char*>(k_cache.data_ptr()), *vc = static_cast<char*>(v_cache.data_ptr());
  const char *kp = static_cast<const char*>(k.data_ptr()), *vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * elem, vs = v.stride(0) * elem, bytes = row * elem, n = k_cache.size(0);
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < n, "store_kv: slot out of range");
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + sp[t] * bytes, kp + t * ks, bytes);
      std::memcpy(vc + sp[t] * bytes, vp + t * vs, bytes);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode);
  m.def("paged_decode_fp8", &paged_decode_fp8);
  m.def("store_kv", &store_kv);
}
