#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

static constexpr int64_t NR = 16;  // features per panel
static constexpr int64_t PG = 4;   // panels stored interleaved: one tile of 4 panels reads one contiguous stream
static constexpr int64_t MB = 64;  // rows per block

// codes (N, K) → (ceil(P/4), K/4, 4, QB) bytes, QB = 32 (4-bit) or 64 (8-bit): quad j (4 k) of the 4 panels of a
// group side by side. 4-bit byte w of a panel's quad: codes of feature w/2 at k = 4j + w%2 (low nibble) and
// k = 4j + 2 + w%2 (high nibble). 8-bit byte w (< 32) of a quad: feature w/2 at k = 4j + w%2; byte 32 + w: k + 2.
torch::Tensor pack_codes(torch::Tensor codes, int64_t bits) {
  TORCH_CHECK(codes.dim() == 2, "pack_codes: (N, K) codes");
  TORCH_CHECK(bits == 4 || bits == 8, "pack_codes: 4 or 8 bits");
  codes = codes.contiguous();
  const int64_t N = codes.size(0), K = codes.size(1), P = (N + NR - 1) / NR, G4 = (P + PG - 1) / PG;
  TORCH_CHECK(K % 4 == 0, "pack_codes: K divisible by 4");
  const int64_t Q = K / 4, QB = bits == 4 ? 32 : 64;
  auto out = torch::zeros({G4, Q, PG, QB}, codes.options().dtype(at::kByte));
  const uint8_t* src = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t f = 0; f < NR && p * NR + f < N; ++f) {
        const uint8_t* s = src + (p * NR + f) * K;
        for (int64_t j = 0; j < Q; ++j) {
          uint8_t* d = dst + (((p / PG) * Q + j) * PG + p % PG) * QB;
          for (int e2 = 0; e2 < 2; ++e2) {
            if (bits == 4) {
              d[2 * f + e2] = (s[4 * j + e2] & 0x0F) | ((s[4 * j + 2 + e2] & 0x0F) << 4);
            } else {
              d[2 * f + e2] = s[4 * j + e2];
              d[32 + 2 * f + e2] = s[4 * j + 2 + e2];
            }
          }
        }
      }
  });
  return out;
}

struct Weights {
  const uint8_t* codes;  // packed codes
  const void* scales;    // (P/4, G, 4, 16) fp16 or fp32
  const void* mins;      // same, or null
  int64_t K, G, group;   // input features, groups, group size
  int64_t Q;             // quads (K / 4)
  float offset;          // affine 4-bit codes: value = (128 + code) - offset
  __m512i table;         // 4-bit code → bf16 value (32 words, first 16 used) for code-book formats
};

// 4-bit, affine: 0x4300 | c is the bf16 of 128 + c (exact), the offset comes off with the group sum of x.
// 4-bit, code book: a 32-entry word permute. 8-bit: int8 → int32 → fp32 → bf16 (exact for |q| <= 256).
template <int MODE>  // 0: 4-bit affine, 1: 4-bit code book, 2: 8-bit
static inline void decode(const uint8_t* p, __m512i table, __m512bh& w0, __m512bh& w1) {
  if constexpr (MODE == 0 || MODE == 1) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi16(0x0F));
    const __m512i hi = _mm512_srli_epi16(b, 4);
    if constexpr (MODE == 0) {
      w0 = (__m512bh)_mm512_or_si512(lo, _mm512_set1_epi16(0x4300));
      w1 = (__m512bh)_mm512_or_si512(hi, _mm512_set1_epi16(0x4300));
    } else {
      w0 = (__m512bh)_mm512_permutexvar_epi16(lo, table);
      w1 = (__m512bh)_mm512_permutexvar_epi16(hi, table);
    }
  } else {
    const __m128i* q = reinterpret_cast<const __m128i*>(p);
    w0 = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))),
                             _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 0))));
    w1 = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 3))),
                             _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 2))));
  }
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

// Rows [0, ROWS) x PANELS panels from panel p0 (p0 % 4 + PANELS <= 4). A: bf16 pairs as int32, lda in pairs.
// xsum: (rows, G) group sums of the rows (read with mins or affine codes).
template <int ROWS, int PANELS, int MODE, bool MINS, typename S, typename T>
static inline void micro(const int32_t* A, int64_t lda, const float* xsum, const Weights& W, int64_t p0, int64_t N,
                         const float* bias, T* out, int64_t ldo) {
  constexpr int64_t QB = MODE == 2 ? 64 : 32;
  __m512 acc[ROWS][PANELS];
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < PANELS; ++q) acc[r][q] = _mm512_setzero_ps();
  const int64_t quads_per_group = W.group / 4;
  const uint8_t* codes = W.codes + ((p0 / PG) * W.Q * PG + p0 % PG) * QB;  // quad j of panel q: + (j*PG + q)*QB
  const int64_t groups_base = (p0 / PG) * W.G * PG * NR + (p0 % PG) * NR;    // group g of panel q: + (g*PG + q)*NR
  for (int64_t g = 0; g < W.G; ++g) {
    __m512 gs[ROWS][PANELS];
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int q = 0; q < PANELS; ++q) gs[r][q] = _mm512_setzero_ps();
    const int64_t quad0 = g * quads_per_group;
    for (int64_t j = quad0; j < quad0 + quads_per_group; ++j) {
      const uint8_t* cj = codes + j * PG * QB;
      // software prefetch only for tiles of 3+ rows: at 1-2 rows the hardware prefetcher alone is faster (M=1:
      // 7.3 -> 6.2 ms without, Q4_0 bench shapes), at 16 rows the prefetch is (30.9 vs 35.3 ms)
      if constexpr (ROWS > 2) _mm_prefetch(reinterpret_cast<const char*>(cj + 16 * PG * QB), _MM_HINT_T0);
      __m512bh w0[PANELS], w1[PANELS];
#pragma GCC unroll 4
      for (int q = 0; q < PANELS; ++q) decode<MODE>(cj + q * QB, W.table, w0[q], w1[q]);
#pragma GCC unroll 6
      for (int r = 0; r < ROWS; ++r) {
        const __m512bh a0 = (__m512bh)_mm512_set1_epi32(A[r * lda + 2 * j]);
        const __m512bh a1 = (__m512bh)_mm512_set1_epi32(A[r * lda + 2 * j + 1]);
#pragma GCC unroll 4
        for (int q = 0; q < PANELS; ++q) {
          gs[r][q] = _mm512_dpbf16_ps(gs[r][q], a0, w0[q]);
          gs[r][q] = _mm512_dpbf16_ps(gs[r][q], a1, w1[q]);
        }
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < PANELS; ++q) {
      const int64_t off = groups_base + (g * PG + q) * NR;
      const __m512 s = load16<S>(W.scales, off);
      __m512 mn = _mm512_setzero_ps();
      if constexpr (MINS) mn = load16<S>(W.mins, off);
#pragma GCC unroll 6
      for (int r = 0; r < ROWS; ++r) {
        __m512 v = gs[r][q];
        if constexpr (MODE == 0) v = _mm512_sub_ps(v, _mm512_set1_ps(W.offset * xsum[r * W.G + g]));
        acc[r][q] = _mm512_fmadd_ps(v, s, acc[r][q]);
        if constexpr (MINS) acc[r][q] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[r * W.G + g]), acc[r][q]);
      }
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < PANELS; ++q) {
    const int64_t n = (p0 + q) * NR;
    const int64_t cols = std::min<int64_t>(NR, N - n);
    if (cols <= 0) break;
    const __mmask16 mask = cols == NR ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; ++r) {
      const __m512 v = _mm512_add_ps(acc[r][q], b);
      _mm256_mask_storeu_epi16(reinterpret_cast<void*>(out + r * ldo + n), mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

template <int MODE, bool MINS, typename S, typename T>
static void tile(int64_t rows, int64_t panels, const int32_t* A, int64_t lda, const float* xsum, const Weights& W,
                 int64_t p0, int64_t N, const float* bias, T* out, int64_t ldo) {
#define LOOM_Q_CALL(R, NP) micro<R, NP, MODE, MINS, S, T>(A, lda, xsum, W, p0, N, bias, out, ldo)
  if (rows == 1) {
    switch (panels) { case 1: LOOM_Q_CALL(1, 1); break; case 2: LOOM_Q_CALL(1, 2); break;
                      case 3: LOOM_Q_CALL(1, 3); break; default: LOOM_Q_CALL(1, 4); }
  } else if (rows == 2) {
    switch (panels) { case 1: LOOM_Q_CALL(2, 1); break; case 2: LOOM_Q_CALL(2, 2); break;
                      case 3: LOOM_Q_CALL(2, 3); break; default: LOOM_Q_CALL(2, 4); }
  } else if (rows == 3) {
    if (panels == 1) LOOM_Q_CALL(3, 1); else LOOM_Q_CALL(3, 2);
  } else {
    if (panels == 1) LOOM_Q_CALL(4, 1); else LOOM_Q_CALL(4, 2);
  }
#undef LOOM_Q_CALL
}

template <int MODE, bool MINS, typename S, typename T>
static void multiply(const int32_t* A, int64_t lda, int64_t M, const float* xsum, const Weights& W, int64_t P,
                     int64_t N, const float* bias, T* out) {
  const int64_t np = M <= 2 ? 4 : 2;  // panels per work item: 4 while a tile has at most 2 rows
  const int64_t items = (P + np - 1) / np;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
      for (int64_t it = b; it < e; ++it) {
        const int64_t p0 = it * np, panels = std::min<int64_t>(np, P - p0);
        for (int64_t i = m0; i < m1; i += 4) {
          const int64_t rows = std::min<int64_t>(4, m1 - i);
          const int64_t step = rows <= 2 ? 4 : 2;  // at 3-4 rows, 2 panels per tile to stay in registers
          for (int64_t q = 0; q < panels; q += step)
            tile<MODE, MINS, S, T>(rows, std::min<int64_t>(step, panels - q), A + i * lda, lda, xsum + i * W.G, W,
                                   p0 + q, N, bias, out + i * N, N);
        }
      }
    });
  }
}

template <int MODE, bool MINS>
static void dispatch_scales(bool half, const int32_t* A, int64_t lda, int64_t M, const float* xsum,
                            const Weights& W, int64_t P, int64_t N, const float* bias, c10::BFloat16* out) {
  if (half) multiply<MODE, MINS, c10::Half>(A, lda, M, xsum, W, P, N, bias, out);
  else multiply<MODE, MINS, float>(A, lda, M, xsum, W, P, N, bias, out);
}

// x (..., K) bf16 → (..., N) bf16. mode: 0 affine 4-bit (value = code - (offset - 128)), 1 code-book 4-bit, 2 8-bit.
torch::Tensor linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                     torch::Tensor table, c10::optional<torch::Tensor> bias, int64_t mode, double offset,
                     int64_t group, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "quantized linear: bf16 input");
  const int64_t K = x.size(-1), G = scales.size(1), P = (N + NR - 1) / NR;
  TORCH_CHECK(G * group == K, "quantized linear: input has ", K, " features, the weight ", G * group);
  TORCH_CHECK(group % 4 == 0 && codes.size(1) * 4 == K, "quantized linear: packed codes do not match");
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto out = torch::empty(shape, x.options());
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M == 0) return out;
  const bool has_mins = mins.has_value() && mins->defined();
  // Group sums of the activations (for mins and affine codes), in fp32, here rather than by torch ops: at one row a
  // layer's whole matmul takes ~50 us and three aten calls would add a fifth to it.
  std::vector<float> xsum_buf;
  if (has_mins || mode == 0) {
    xsum_buf.resize(M * G);
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(x2.data_ptr());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* p = xb + m * K + g * group;
        __m512 s = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= group; k += 16)
          s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k))),
                                   16)));
        float total = _mm512_reduce_add_ps(s);
        for (; k < group; ++k) {
          uint32_t bits = static_cast<uint32_t>(p[k]) << 16;
          float v;
          std::memcpy(&v, &bits, 4);
          total += v;
        }
        xsum_buf[m * G + g] = total;
      }
  }
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  Weights W{codes.data_ptr<uint8_t>(), scales.data_ptr(), has_mins ? mins->data_ptr() : nullptr, K, G, group,
            K / 4, static_cast<float>(offset), _mm512_loadu_si512(table.data_ptr())};
  const int32_t* A = reinterpret_cast<const int32_t*>(x2.data_ptr());
  const float* xs = xsum_buf.empty() ? nullptr : xsum_buf.data();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const bool half = scales.scalar_type() == at::kHalf;
  auto* op = out.data_ptr<c10::BFloat16>();
#define LOOM_Q_MODE(MD)                                                                   \
  if (has_mins) dispatch_scales<MD, true>(half, A, K / 2, M, xs, W, P, N, bp, op);        \
  else dispatch_scales<MD, false>(half, A, K / 2, M, xs, W, P, N, bp, op);
  if (mode == 0) { LOOM_Q_MODE(0) } else if (mode == 1) { LOOM_Q_MODE(1) } else { LOOM_Q_MODE(2) }
#undef LOOM_Q_MODE
  return out;
}

bool supported() { return true; }
#else
torch::Tensor pack_codes(torch::Tensor, int64_t) { TORCH_CHECK(false, "built without AVX-512 BF16"); }
torch::Tensor linear(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, torch::Tensor,
                     c10::optional<torch::Tensor>, int64_t, double, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AVX-512 BF16");
}
bool supported() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_codes", &pack_codes);
  m.def("linear", &linear);
  m.def("supported", &supported);
}
