#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static constexpr int64_t NR = 16;  // output features per weight panel: two 8-wide fp32 vectors
static constexpr int64_t MR = 6;   // rows per activation tile: 6 x 2 accumulators + 2 weight vectors + 1 broadcast
static constexpr int64_t MC = 96;  // rows per pass over this thread's panels (the packed rows stay in L2)
static constexpr int64_t KC = 256;  // k per block of a panel

// Panel word 2i holds feature i and word 2i+1 feature 8+i, so the low half of each 32-bit lane is feature i
// (shift left 16 → fp32) and the high half feature 8+i (mask the low half off → fp32).
static inline int64_t feature_of_word(int64_t j) { return (j % 2) ? 8 + j / 2 : j / 2; }

torch::Tensor pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack: a 2-D bf16 weight");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  auto out = torch::zeros({P, K, NR}, w.options());  // features past N stay zero
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t j = 0; j < NR; ++j) {
        const int64_t n = p * NR + feature_of_word(j);
        if (n >= N) continue;
        const uint16_t* s = src + n * K;
        uint16_t* d = dst + p * K * NR + j;
        for (int64_t k = 0; k < K; ++k) d[k * NR] = s[k];
      }
  });
  return out;
}

static inline __m256 low_features(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
static inline __m256 high_features(__m256i w, __m256i mask) { return _mm256_castsi256_ps(_mm256_and_si256(w, mask)); }

// C (ROWS x 16, fp32) (+)= A tile (k0..k1 of K x MR, packed, ROWS used) . panel (k0..k1 of K x 16)
template <int ROWS>
static inline void tile(const float* A, const uint16_t* B, int64_t k0, int64_t k1, bool accumulate, float* C) {
  __m256 lo[ROWS], hi[ROWS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    lo[r] = accumulate ? _mm256_loadu_ps(C + r * NR) : _mm256_setzero_ps();
    hi[r] = accumulate ? _mm256_loadu_ps(C + r * NR + 8) : _mm256_setzero_ps();
  }
  const __m256i mask = _mm256_set1_epi32(0xffff0000);
  for (int64_t k = k0; k < k1; ++k) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k * NR));
    const __m256 b0 = low_features(w), b1 = high_features(w, mask);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + k * MR + r);
      lo[r] = _mm256_fmadd_ps(a, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(a, b1, hi[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) { _mm256_storeu_ps(C + r * NR, lo[r]); _mm256_storeu_ps(C + r * NR + 8, hi[r]); }
}

// One row (decode at batch 1): even and odd k accumulate apart so FMA latency does not throttle the weight stream.
static inline void one_row(const float* A, const uint16_t* B, int64_t K, float* C) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xffff0000);
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k * NR));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + (k + 1) * NR));
    const __m256 x0 = _mm256_set1_ps(A[k]), x1 = _mm256_set1_ps(A[k + 1]);
    a0 = _mm256_fmadd_ps(x0, low_features(w0), a0);
    a1 = _mm256_fmadd_ps(x0, high_features(w0, mask), a1);
    a2 = _mm256_fmadd_ps(x1, low_features(w1), a2);
    a3 = _mm256_fmadd_ps(x1, high_features(w1, mask), a3);
  }
  if (k < K) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k * NR));
    const __m256 x0 = _mm256_set1_ps(A[k]);
    a0 = _mm256_fmadd_ps(x0, low_features(w0), a0);
    a1 = _mm256_fmadd_ps(x0, high_features(w0, mask), a1);
  }
  _mm256_storeu_ps(C, _mm256_add_ps(a0, a2));
  _mm256_storeu_ps(C + 8, _mm256_add_ps(a1, a3));
}

static void run_tile(int64_t rows, const float* a, const uint16_t* B, int64_t k0, int64_t k1, bool acc, float* C) {
  switch (rows) {
    case 1: tile<1>(a, B, k0, k1, acc, C); break;
    case 2: tile<2>(a, B, k0, k1, acc, C); break;
    case 3: tile<3>(a, B, k0, k1, acc, C); break;
    case 4: tile<4>(a, B, k0, k1, acc, C); break;
    case 5: tile<5>(a, B, k0, k1, acc, C); break;
    default: tile<6>(a, B, k0, k1, acc, C); break;
  }
}

template <typename T>
static void store_tile(const float* C, int64_t rows, int64_t n0, int64_t N, const float* bias, T* out, int64_t m0) {
  const int64_t cols = std::min<int64_t>(NR, N - n0);
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + (m0 + r) * N + n0;
    for (int64_t j = 0; j < cols; ++j) o[j] = static_cast<T>(C[r * NR + j] + (bias ? bias[n0 + j] : 0.f));
  }
}

// x (..., K) fp32 or bf16; packed (P, K, 16) from pack(); → (..., N) in x's dtype.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, int64_t N) {
  const int64_t P = packed.size(0), K = packed.size(1);
  TORCH_CHECK(x.size(-1) == K, "linear: input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "linear: fp32 or bf16 input");
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0), lda = x2.stride(0);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out.view(shape);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const uint16_t* Bp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  // Rows widened to fp32 and packed into MR-row tiles (k-major), so each tile's broadcasts walk one contiguous
  // stream; one row is only widened.
  const int64_t tiles = (M + MR - 1) / MR;
  auto At = torch::empty({M == 1 ? K : tiles * K * MR}, x.options().dtype(at::kFloat));
  float* Atp = At.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bf16_weight_pack_rows", [&] {
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    if (M == 1) {
      for (int64_t k = 0; k < K; ++k) Atp[k] = static_cast<float>(xp[k]);
      return;
    }
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* d = Atp + t * K * MR;
        for (int64_t r = 0; r < MR; ++r) {
          const int64_t row = t * MR + r;
          if (row < M) {
            const scalar_t* s = xp + row * lda;
            for (int64_t k = 0; k < K; ++k) d[k * MR + r] = static_cast<float>(s[k]);
          } else {
            for (int64_t k = 0; k < K; ++k) d[k * MR + r] = 0.f;
          }
        }
      }
    });
  });
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bf16_weight_linear", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      if (M == 1) {
        alignas(32) float C[NR];
        for (int64_t p = begin; p < end; ++p) {
          one_row(Atp, Bp + p * K * NR, K, C);
          store_tile<scalar_t>(C, 1, p * NR, N, bp, op, 0);
        }
        return;
      }
      // Rows in chunks of MC, k in blocks of KC: a block of the panel (KC x 16 bf16 = 8 KB) stays in L1 while
      // every tile of the chunk multiplies it; the tiles' partial sums wait in `partial` between k blocks.
      alignas(32) float partial[MC * NR];
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t m1 = std::min(M, m0 + MC);
        for (int64_t p = begin; p < end; ++p) {
          const uint16_t* panel = Bp + p * K * NR;
          for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t k1 = std::min(K, k0 + KC);
            for (int64_t i = m0; i < m1; i += MR)
              run_tile(std::min<int64_t>(MR, m1 - i), Atp + (i / MR) * K * MR, panel, k0, k1, k0 > 0,
                       partial + (i - m0) * NR);
          }
          for (int64_t i = m0; i < m1; i += MR)
            store_tile<scalar_t>(partial + (i - m0) * NR, std::min<int64_t>(MR, m1 - i), p * NR, N, bp, op, i);
        }
      }
    });
  });
  return out.view(shape);
}

bool supported() { return true; }
#else
torch::Tensor pack(torch::Tensor w) { TORCH_CHECK(false, "built without AVX2/FMA"); }
torch::Tensor linear(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t) {
  TORCH_CHECK(false, "built without AVX2/FMA");
}
bool supported() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack);
  m.def("linear", &linear);
  m.def("supported", &supported);
}
