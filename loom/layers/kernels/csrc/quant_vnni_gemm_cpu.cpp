#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

static constexpr int64_t NR = 16;
static constexpr int64_t PG = 4;
static constexpr int64_t MB = 64;

// codes (N, K) → interleaved steps. bits 4: uint8 codes in [0, 15]; bits 8: int8 codes, stored + 128.
torch::Tensor pack_codes(torch::Tensor codes, int64_t bits) {
  TORCH_CHECK(codes.dim() == 2 && (bits == 4 || bits == 8), "pack_codes: (N, K) codes of 4 or 8 bits");
  codes = codes.contiguous();
  const int64_t N = codes.size(0), K = codes.size(1), P = (N + NR - 1) / NR, G4 = (P + PG - 1) / PG;
  const int64_t kstep = bits == 4 ? 8 : 4;
  TORCH_CHECK(K % kstep == 0, "pack_codes: K divisible by ", kstep);
  const int64_t S = K / kstep;
  auto out = torch::zeros({G4, S, PG, 64}, codes.options().dtype(at::kByte));
  if (bits == 8) out.fill_(128);  // padding features: value 0
  const uint8_t* src = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t f = 0; f < NR && p * NR + f < N; ++f) {
        const uint8_t* s = src + (p * NR + f) * K;
        for (int64_t t = 0; t < S; ++t) {
          uint8_t* d = dst + (((p / PG) * S + t) * PG + p % PG) * 64 + 4 * f;
          for (int i = 0; i < 4; ++i) {
            if (bits == 4) d[i] = (s[8 * t + i] & 0x0F) | ((s[8 * t + 4 + i] & 0x0F) << 4);
            else d[i] = static_cast<uint8_t>(static_cast<int>(static_cast<int8_t>(s[4 * t + i])) + 128);
          }
        }
      }
  });
  return out;
}

struct Acts {  // one block of rows' activations, quantized
  std::vector<int8_t> q;      // (M, K)
  std::vector<float> scale;   // (M, K / AB)
  std::vector<int32_t> isum;  // (M, K / AB): Σ q per block
  std::vector<float> xsum;    // (M, G): Σ x per weight group, exact (for mins)
};

static void quantize_rows(const uint16_t* x, int64_t M, int64_t K, int64_t AB, int64_t group, bool sums, Acts& a) {
  const int64_t NB = K / AB, G = K / group;
  a.q.resize(M * K);
  a.scale.resize(M * NB);
  a.isum.resize(M * NB);
  if (sums) a.xsum.assign(M * G, 0.0f);
  if (AB == 32) {  // the common case, vectorized: two 16-lane halves per block
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t b = 0; b < NB; ++b) {
          const uint16_t* p = x + m * K + b * 32;
          const __m512 v0 = _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
          const __m512 v1 = _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))), 16));
          const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
          const float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
          const __m512 vi = _mm512_set1_ps(inv);
          const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          int8_t* q = a.q.data() + m * K + b * 32;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(q0));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(q1));
          a.scale[m * NB + b] = d;
          a.isum[m * NB + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
          if (sums) a.xsum[m * G + (b * 32) / group] += _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        }
    });
    return;
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < NB; ++b) {
      const uint16_t* p = x + m * K + b * AB;
      float v[32];
      float amax = 0.0f, total = 0.0f;
      for (int64_t i = 0; i < AB; ++i) {
        uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
        std::memcpy(&v[i], &bits, 4);
        amax = std::max(amax, std::fabs(v[i]));
        total += v[i];
      }
      const float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
      int32_t s = 0;
      int8_t* q = a.q.data() + m * K + b * AB;
      for (int64_t i = 0; i < AB; ++i) {
        const int32_t r = static_cast<int32_t>(std::nearbyint(v[i] * inv));
        q[i] = static_cast<int8_t>(r);
        s += r;
      }
      a.scale[m * NB + b] = d;
      a.isum[m * NB + b] = s;
      if (sums) a.xsum[m * G + (b * AB) / group] += total;
    }
}

struct Weights {
  const uint8_t* codes;
  const void* scales;
  const void* mins;
  int64_t K, G, group, S;  // S: k-steps (K / 8 for 4-bit, K / 4 for 8-bit)
  int32_t off;             // value = code - off
};

// fp32 → bf16, round to nearest even (as torch rounds), with AVX-512F only: VNNI CPUs without BF16 run this too.
static inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

template <typename S>
static inline __m512 load16(const void* base, int64_t off) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(base) + off);
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
        reinterpret_cast<const uint16_t*>(base) + off)));
  }
}

// Rows [0, ROWS) x PANELS panels from p0. AB: activation block (k); ONE: one block per weight group.
template <int ROWS, int PANELS, int BITS, bool MINS, bool ONE, typename S>
static inline void micro(const Acts& a, int64_t row0, int64_t AB, const Weights& W, int64_t p0, int64_t N,
                         const float* bias, c10::BFloat16* out, int64_t ldo) {
  constexpr int64_t KS = BITS == 4 ? 8 : 4;  // k per step
  const int64_t K = W.K, NB = K / AB, blocks_per_group = W.group / AB, steps_per_block = AB / KS;
  __m512 acc[ROWS][PANELS];
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < PANELS; ++q) acc[r][q] = _mm512_setzero_ps();
  const uint8_t* codes = W.codes + ((p0 / PG) * W.S * PG + p0 % PG) * 64;
  const int64_t groups_base = (p0 / PG) * W.G * PG * NR + (p0 % PG) * NR;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < W.G; ++g) {
    __m512 gacc[ONE ? 1 : ROWS][ONE ? 1 : PANELS];
    if constexpr (!ONE) {
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
        for (int q = 0; q < PANELS; ++q) gacc[r][q] = _mm512_setzero_ps();
    }
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      __m512i iacc[ROWS][PANELS];
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
        for (int q = 0; q < PANELS; ++q) iacc[r][q] = _mm512_setzero_si512();
      const int64_t t0 = b * AB / KS;
      for (int64_t t = t0; t < t0 + steps_per_block; ++t) {
        // no software prefetch: the hardware's stream prefetcher does better on this one stream per tile (measured
        // 8 / 16 / 32 steps ahead against none: none 20-25% faster at 1 and 16 rows, Zen 4)
        const uint8_t* ct = codes + t * PG * 64;
        if constexpr (BITS == 4) {
          __m512i w0[PANELS], w1[PANELS];
#pragma GCC unroll 4
          for (int q = 0; q < PANELS; ++q) {
            const __m512i v = _mm512_loadu_si512(ct + q * 64);
            w0[q] = _mm512_and_si512(v, low4);
            w1[q] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          }
#pragma GCC unroll 4
          for (int r = 0; r < ROWS; ++r) {
            const int8_t* xr = a.q.data() + (row0 + r) * K + 8 * t;
            int32_t x0, x1;
            std::memcpy(&x0, xr, 4);
            std::memcpy(&x1, xr + 4, 4);
            const __m512i a0 = _mm512_set1_epi32(x0), a1 = _mm512_set1_epi32(x1);
#pragma GCC unroll 4
            for (int q = 0; q < PANELS; ++q) {
              iacc[r][q] = _mm512_dpbusd_epi32(iacc[r][q], w0[q], a0);
              iacc[r][q] = _mm512_dpbusd_epi32(iacc[r][q], w1[q], a1);
            }
          }
        } else {
          __m512i w0[PANELS];
#pragma GCC unroll 4
          for (int q = 0; q < PANELS; ++q) w0[q] = _mm512_loadu_si512(ct + q * 64);
#pragma GCC unroll 4
          for (int r = 0; r < ROWS; ++r) {
            int32_t x0;
            std::memcpy(&x0, a.q.data() + (row0 + r) * K + 4 * t, 4);
            const __m512i a0 = _mm512_set1_epi32(x0);
#pragma GCC unroll 4
            for (int q = 0; q < PANELS; ++q) iacc[r][q] = _mm512_dpbusd_epi32(iacc[r][q], w0[q], a0);
          }
        }
      }
      // Σ (u − off) q_x = Σ u q_x − off Σ q_x, exact in int32; then the activations' block scale
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        const int64_t ab = (row0 + r) * NB + b;
        const __m512i corr = _mm512_set1_epi32(W.off * a.isum[ab]);
        const __m512 sx = _mm512_set1_ps(a.scale[ab]);
#pragma GCC unroll 4
        for (int q = 0; q < PANELS; ++q) {
          const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[r][q], corr)), sx);
          if constexpr (ONE) iacc[r][q] = _mm512_castps_si512(v);  // the group's sum, folded below
          else gacc[r][q] = _mm512_add_ps(gacc[r][q], v);
        }
      }
      if constexpr (ONE) {
#pragma GCC unroll 4
        for (int q = 0; q < PANELS; ++q) {
          const int64_t off = groups_base + (g * PG + q) * NR;
          const __m512 s = load16<S>(W.scales, off);
          __m512 mn = _mm512_setzero_ps();
          if constexpr (MINS) mn = load16<S>(W.mins, off);
#pragma GCC unroll 4
          for (int r = 0; r < ROWS; ++r) {
            acc[r][q] = _mm512_fmadd_ps(_mm512_castsi512_ps(iacc[r][q]), s, acc[r][q]);
            if constexpr (MINS)
              acc[r][q] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.xsum[(row0 + r) * W.G + g]), acc[r][q]);
          }
        }
      }
    }
    if constexpr (!ONE) {
#pragma GCC unroll 4
      for (int q = 0; q < PANELS; ++q) {
        const int64_t off = groups_base + (g * PG + q) * NR;
        const __m512 s = load16<S>(W.scales, off);
        __m512 mn = _mm512_setzero_ps();
        if constexpr (MINS) mn = load16<S>(W.mins, off);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; ++r) {
          acc[r][q] = _mm512_fmadd_ps(gacc[r][q], s, acc[r][q]);
          if constexpr (MINS)
            acc[r][q] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.xsum[(row0 + r) * W.G + g]), acc[r][q]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < PANELS; ++q) {
    const int64_t n = (p0 + q) * NR;
    const int64_t cols = std::min<int64_t>(NR, N - n);
    if (cols <= 0) break;
    const __mmask16 mask = cols == NR ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
      _mm256_mask_storeu_epi16(reinterpret_cast<void*>(out + r * ldo + n), mask, to_bf16(_mm512_add_ps(acc[r][q], bv)));
  }
}

template <int BITS, bool MINS, bool ONE, typename S>
static void tile(int64_t rows, int64_t panels, const Acts& a, int64_t row0, int64_t AB, const Weights& W,
                 int64_t p0, int64_t N, const float* bias, c10::BFloat16* out, int64_t ldo) {
#define LOOM_V_CALL(R, NP) micro<R, NP, BITS, MINS, ONE, S>(a, row0, AB, W, p0, N, bias, out, ldo)
  if (rows == 1) {
    switch (panels) { case 1: LOOM_V_CALL(1, 1); break; case 2: LOOM_V_CALL(1, 2); break;
                      case 3: LOOM_V_CALL(1, 3); break; default: LOOM_V_CALL(1, 4); }
  } else if (rows == 2) {
    switch (panels) { case 1: LOOM_V_CALL(2, 1); break; case 2: LOOM_V_CALL(2, 2); break;
                      case 3: LOOM_V_CALL(2, 3); break; default: LOOM_V_CALL(2, 4); }
  } else if (rows == 3) {
    if (panels == 1) LOOM_V_CALL(3, 1); else LOOM_V_CALL(3, 2);
  } else {
    if (panels == 1) LOOM_V_CALL(4, 1); else LOOM_V_CALL(4, 2);
  }
#undef LOOM_V_CALL
}

template <int BITS, bool MINS, bool ONE, typename S>
static void multiply(const Acts& a, int64_t M, int64_t AB, const Weights& W, int64_t P, int64_t N,
                     const float* bias, c10::BFloat16* out) {
  const int64_t np = M <= 2 ? 4 : 2;
  const int64_t items = (P + np - 1) / np;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
      for (int64_t it = b; it < e; ++it) {
        const int64_t p0 = it * np, panels = std::min<int64_t>(np, P - p0);
        for (int64_t i = m0; i < m1; i += 4) {
          const int64_t rows = std::min<int64_t>(4, m1 - i);
          const int64_t step = rows <= 2 ? 4 : 2;
          for (int64_t q = 0; q < panels; q += step)
            tile<BITS, MINS, ONE, S>(rows, std::min<int64_t>(step, panels - q), a, i, AB, W, p0 + q, N, bias,
                                     out + i * N, N);
        }
      }
    });
  }
}

template <int BITS, bool MINS>
static void dispatch(bool one, bool half, const Acts& a, int64_t M, int64_t AB, const Weights& W, int64_t P,
                     int64_t N, const float* bias, c10::BFloat16* out) {
  if (one) {
    if (half) multiply<BITS, MINS, true, c10::Half>(a, M, AB, W, P, N, bias, out);
    else multiply<BITS, MINS, true, float>(a, M, AB, W, P, N, bias, out);
  } else {
    if (half) multiply<BITS, MINS, false, c10::Half>(a, M, AB, W, P, N, bias, out);
    else multiply<BITS, MINS, false, float>(a, M, AB, W, P, N, bias, out);
  }
}

// x (..., K) bf16 → (..., N) bf16. Weight value = code − off (off: 4-bit z; 8-bit 128, the storage offset).
torch::Tensor linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                     c10::optional<torch::Tensor> bias, int64_t bits, int64_t off, int64_t group, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "quantized linear: bf16 input");
  const int64_t K = x.size(-1), G = scales.size(1), P = (N + NR - 1) / NR;
  const int64_t kstep = bits == 4 ? 8 : 4;
  TORCH_CHECK(G * group == K && group % kstep == 0, "quantized linear: input has ", K, " features, groups ", G,
              " x ", group);
  TORCH_CHECK(codes.size(1) * kstep == K, "quantized linear: packed codes do not match the input");
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto out = torch::empty(shape, x.options());
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M == 0) return out;
  const bool has_mins = mins.has_value() && mins->defined();
  // activation blocks of 32 (of the group when groups are smaller), within one weight group each
  int64_t AB = std::min<int64_t>(group, 32);
  while (group % AB != 0 || AB % kstep != 0) AB -= kstep;
  Acts a;
  quantize_rows(reinterpret_cast<const uint16_t*>(x2.data_ptr()), M, K, AB, group, has_mins, a);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  Weights W{codes.data_ptr<uint8_t>(), scales.data_ptr(), has_mins ? mins->data_ptr() : nullptr, K, G, group,
            K / kstep, static_cast<int32_t>(off)};
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const bool half = scales.scalar_type() == at::kHalf, one = AB == group;
  auto* op = out.data_ptr<c10::BFloat16>();
  if (bits == 4) {
    if (has_mins) dispatch<4, true>(one, half, a, M, AB, W, P, N, bp, op);
    else dispatch<4, false>(one, half, a, M, AB, W, P, N, bp, op);
  } else {
    if (has_mins) dispatch<8, true>(one, half, a, M, AB, W, P, N, bp, op);
    else dispatch<8, false>(one, half, a, M, AB, W, P, N, bp, op);
  }
  return out;
}

bool supported() { return true; }
#else
torch::Tensor pack_codes(torch::Tensor, int64_t) { TORCH_CHECK(false, "built without AVX-512 VNNI"); }
torch::Tensor linear(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                     c10::optional<torch::Tensor>, int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AVX-512 VNNI");
}
bool supported() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_codes", &pack_codes);
  m.def("linear", &linear);
  m.def("supported", &supported);
}
