#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

static constexpr int64_t NR = 16;  // features per panel (one fp32 vector)
static constexpr int MR = 6;       // rows per micro-tile: 6 x 4 accumulators + 4 weight vectors + 1 broadcast
static constexpr int NP = 4;       // panels per micro-tile
static constexpr int64_t MB = 96;  // rows per block: the block's rows are multiplied by one panel group in turn


// (N, K) bf16 → (P, Kh, 16, 2) bf16 with P = ceil(N / 16), Kh = ceil(K / 2); padding is zero.
torch::Tensor pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack: a 2-D bf16 weight");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR, Kh = (K + 1) / 2;
  auto out = torch::zeros({P, Kh, NR, 2}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t j = 0; j < NR; ++j) {
        const int64_t n = p * NR + j;
        if (n >= N) continue;
        const uint16_t* s = src + n * K;
        uint16_t* d = dst + p * Kh * NR * 2 + j * 2;
        for (int64_t k = 0; k < K; ++k) d[(k / 2) * NR * 2 + (k % 2)] = s[k];
      }
  });
  return out;
}

// out rows [0, ROWS) x features [n0, n0 + 16 * PANELS) = A rows . panels, + bias; A rows are bf16 pairs (int32).
template <int ROWS, int PANELS, typename T>
static inline void micro(const int32_t* A, int64_t lda, const uint16_t* B, int64_t Kh, int64_t n0, int64_t N,
                         const float* bias, T* out, int64_t ldo) {
  __m512 acc[ROWS][PANELS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < PANELS; ++q) acc[r][q] = _mm512_setzero_ps();
  const int64_t pstride = Kh * NR * 2;
  for (int64_t kp = 0; kp < Kh; ++kp) {
    __m512bh w[PANELS];
#pragma GCC unroll 4
    for (int q = 0; q < PANELS; ++q)
      w[q] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(B + q * pstride + kp * NR * 2));
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(A[r * lda + kp]);
#pragma GCC unroll 4
      for (int q = 0; q < PANELS; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], a, w[q]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < PANELS; ++q) {
    const int64_t n = n0 + q * NR;
    const int64_t cols = std::min<int64_t>(NR, N - n);
    if (cols <= 0) break;
    const __mmask16 mask = cols == NR ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m512 v = _mm512_add_ps(acc[r][q], b);
      if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(out + r * ldo + n, mask, v);
      } else {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(reinterpret_cast<void*>(out + r * ldo + n), mask, h);
      }
    }
  }
}

template <int PANELS, typename T>
static inline void rows_tile(int64_t rows, const int32_t* A, int64_t lda, const uint16_t* B, int64_t Kh, int64_t n0,
                             int64_t N, const float* bias, T* out, int64_t ldo) {
  switch (rows) {
    case 1: micro<1, PANELS, T>(A, lda, B, Kh, n0, N, bias, out, ldo); break;
    case 2: micro<2, PANELS, T>(A, lda, B, Kh, n0, N, bias, out, ldo); break;
    case 3: micro<3, PANELS, T>(A, lda, B, Kh, n0, N, bias, out, ldo); break;
    case 4: micro<4, PANELS, T>(A, lda, B, Kh, n0, N, bias, out, ldo); break;
    case 5: micro<5, PANELS, T>(A, lda, B, Kh, n0, N, bias, out, ldo); break;
    default: micro<6, PANELS, T>(A, lda, B, Kh, n0, N, bias, out, ldo); break;
  }
}

template <typename T>
static inline void tile(int64_t rows, int64_t panels, const int32_t* A, int64_t lda, const uint16_t* B, int64_t Kh,
                        int64_t n0, int64_t N, const float* bias, T* out, int64_t ldo) {
  switch (panels) {
    case 1: rows_tile<1, T>(rows, A, lda, B, Kh, n0, N, bias, out, ldo); break;
    case 2: rows_tile<2, T>(rows, A, lda, B, Kh, n0, N, bias, out, ldo); break;
    case 3: rows_tile<3, T>(rows, A, lda, B, Kh, n0, N, bias, out, ldo); break;
    default: rows_tile<4, T>(rows, A, lda, B, Kh, n0, N, bias, out, ldo); break;
  }
}

// a (M, K) bf16 rows . packed panels (+ bias) → out (M, N) of T.
template <typename T>
static void multiply(const at::Tensor& a_in, const uint16_t* Bp, int64_t P, int64_t Kh, const float* bp, T* op,
                     int64_t N) {
  const int64_t M = a_in.size(0), K = a_in.size(1);
  // Rows as bf16 pairs: contiguous bf16 with an even row stride, else a padded copy.
  at::Tensor a = a_in;
  if (a.stride(1) != 1 || (K % 2) != 0 || (a.stride(0) % 2) != 0 ||
      (reinterpret_cast<uintptr_t>(a.data_ptr()) % 4) != 0) {
    a = torch::zeros({M, 2 * Kh}, a_in.options());
    a.narrow(1, 0, K).copy_(a_in);
  }
  const int32_t* Ap = reinterpret_cast<const int32_t*>(a.data_ptr());
  const int64_t lda = a.stride(0) / 2;
  const int64_t G = (P + NP - 1) / NP;  // panel groups
  const int64_t pstride = Kh * NR * 2;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t p0 = g * NP, panels = std::min<int64_t>(NP, P - p0);
        for (int64_t i = m0; i < m1; i += MR)
          tile<T>(std::min<int64_t>(MR, m1 - i), panels, Ap + i * lda, lda, Bp + p0 * pstride, Kh, p0 * NR, N, bp,
                  op + i * N, N);
      }
    });
  }
}

// x (..., K) bf16 or fp32; packed (P, Kh, 16, 2) from pack(); → (..., N) in x's dtype. An fp32 input is split
// into two bf16 parts (x = hi + lo + O(2^-16 x)) multiplied in turn, so its product keeps fp32-like precision.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, int64_t N) {
  const int64_t P = packed.size(0), Kh = packed.size(1);
  const int64_t K = x.size(-1);
  TORCH_CHECK((K + 1) / 2 == Kh, "linear: input has ", K, " features, the weight ", 2 * Kh);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "linear: fp32 or bf16 input");
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto out = torch::empty(shape, x.options());
  auto x2 = x.reshape({-1, K});
  if (x2.size(0) == 0) return out;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const uint16_t* Bp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  if (x.scalar_type() == at::kBFloat16) {
    multiply<c10::BFloat16>(x2, Bp, P, Kh, bp, out.data_ptr<c10::BFloat16>(), N);
    return out;
  }
  auto hi = x2.to(at::kBFloat16);
  auto lo = (x2 - hi.to(at::kFloat)).to(at::kBFloat16);
  multiply<float>(hi, Bp, P, Kh, bp, out.data_ptr<float>(), N);
  auto low_part = torch::empty({x2.size(0), N}, x.options());
  multiply<float>(lo, Bp, P, Kh, nullptr, low_part.data_ptr<float>(), N);
  out.view({-1, N}).add_(low_part);
  return out;
}

bool supported() { return true; }
#else
torch::Tensor pack(torch::Tensor) { TORCH_CHECK(false, "built without AVX-512 BF16"); }
torch::Tensor linear(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t) {
  TORCH_CHECK(false, "built without AVX-512 BF16");
}
bool supported() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack);
  m.def("linear", &linear);
  m.def("supported", &supported);
}
