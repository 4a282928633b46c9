#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Round a float to T and back, as storing an op's result in a T tensor does.
template <typename T> static inline float round_to(float x) { return static_cast<float>(static_cast<T>(x)); }
template <> inline float round_to<float>(float x) { return x; }

template <typename T> static inline float as_float(const T* p) { return static_cast<float>(*p); }
template <> inline float as_float<c10::BFloat16>(const c10::BFloat16* p) {
  uint32_t bits = static_cast<uint32_t>(p->x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Llama-style RMSNorm: y = T(x * rsqrt(mean(x²) + eps)) in fp32, then weight * y in T (one more rounding).
template <typename T>
static void rms_norm_kernel(const T* x, int64_t x_stride, const T* w, T* out, int64_t rows, int64_t H, float eps) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) { const float v = as_float(xr + i); ss += v * v; }
      const float inv = 1.f / std::sqrt(ss / (float)H + eps);
      T* o = out + r * H;
      for (int64_t i = 0; i < H; ++i) o[i] = static_cast<T>(as_float(w + i) * round_to<T>(as_float(xr + i) * inv));
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  const int64_t H = x.size(-1);
  auto x2 = x.reshape({-1, H});
  TORCH_CHECK(x2.stride(1) == 1 && weight.is_contiguous(), "rms_norm: rows must be contiguous");
  auto out = torch::empty({x2.size(0), H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "loom_rms_norm", [&] {
    rms_norm_kernel<scalar_t>(x2.data_ptr<scalar_t>(), x2.stride(0), weight.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), x2.size(0), H, (float)eps);
  });
  return out.view(x.sizes());
}

// NeoX-style rotary on the first `rd` features of each head: x * cos + rotate_half(x) * sin, with cos and sin
// cast to T, each product rounded to T, then the sum (torch's order). cos/sin tables: (positions, rd) fp32.
// Output row t goes to out + (out_rows ? out_rows[t] : t) * heads * D (a KV cache's slots, or packed rows).
template <typename T>
static void rotary_kernel(const T* x, int64_t row_stride, int64_t heads, int64_t D, const float* cos,
                          const float* sin, const int64_t* pos, int64_t rd, T* out, int64_t T_rows,
                          const int64_t* out_rows = nullptr) {
  const int64_t half = rd / 2;
  at::parallel_for(0, T_rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(2 * rd);  // this token's cos and sin, cast to T once for all its heads
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + pos[t] * rd;
      const float* s = sin + pos[t] * rd;
      for (int64_t i = 0; i < rd; ++i) { cs[i] = round_to<T>(c[i]); cs[rd + i] = round_to<T>(s[i]); }
      const float *cr = cs.data(), *sr = cs.data() + rd;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xh = x + t * row_stride + h * D;
        T* oh = out + ((out_rows ? out_rows[t] : t) * heads + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = as_float(xh + i), x2 = as_float(xh + i + half);
          oh[i] = static_cast<T>(round_to<T>(x1 * cr[i]) + round_to<T>(-x2 * sr[i]));
          oh[i + half] = static_cast<T>(round_to<T>(x2 * cr[i + half]) + round_to<T>(x1 * sr[i + half]));
        }
        for (int64_t i = rd; i < D; ++i) oh[i] = xh[i];
      }
    }
  });
}

// x: (T, heads, D) whose heads and features are contiguous (rows may be strided: a slice of a fused qkv output).
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions, int64_t rd) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rotary: (T, heads, D) with packed heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat, "rotary: fp32 tables");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "rotary: int64 positions");
  auto out = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "loom_rotary", [&] {
    rotary_kernel<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.size(1), x.size(2), cos.data_ptr<float>(),
                            sin.data_ptr<float>(), positions.data_ptr<int64_t>(), rd, out.data_ptr<scalar_t>(),
                            x.size(0));
  });
  return out;
}

// The front of attention for a fused qkv projection, in one call: rotary on q (returned, (T, Hq, D)) and on k
// (written straight into its cache slot), v copied into its slot. qkv: (T, (Hq + 2 Hkv) * D), features contiguous;
// caches (slots, Hkv, D) contiguous. The same roundings as `rotary` then store_kv: only the calls are saved.
torch::Tensor rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions, int64_t rd,
                         int64_t Hq, int64_t Hkv, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  const int64_t T = qkv.size(0), D = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (Hq + 2 * Hkv) * D, "rope_store: qkv rows");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(1) == Hkv &&
              k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "rope_store: caches");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat, "rope_store: fp32 tables");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.size(0) == T &&
              slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == T, "rope_store: rows");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t n = k_cache.size(0), P = cos.size(0);
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < n, "rope_store: slot out of range");
    TORCH_CHECK(pp[t] >= 0 && pp[t] < P, "rope_store: position out of range");
  }
  auto q = torch::empty({T, Hq, D}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "loom_rope_store", [&] {
    const scalar_t* x = qkv.data_ptr<scalar_t>();
    const int64_t stride = qkv.stride(0);
    const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
    rotary_kernel<scalar_t>(x, stride, Hq, D, c, s, pp, rd, q.data_ptr<scalar_t>(), T);
    rotary_kernel<scalar_t>(x + Hq * D, stride, Hkv, D, c, s, pp, rd, k_cache.data_ptr<scalar_t>(), T, sp);
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(vc + sp[t] * Hkv * D, x + t * stride + (Hq + Hkv) * D, Hkv * D * sizeof(scalar_t));
  });
  return q;
}

// Residual add then Llama RMSNorm, as `residual = residual + x; y = norm(residual)` in torch: the sum rounded to T
// (written back into `residual`), then the norm of the rounded sum. One call instead of two; same values.
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  const int64_t H = x.size(-1);
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous() &&
              x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(), "add_rms_norm: shapes");
  const int64_t rows = x.numel() / std::max<int64_t>(H, 1);
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "loom_add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t i = 0; i < H; ++i)
          rp[r * H + i] = static_cast<scalar_t>(as_float(rp + r * H + i) + as_float(xp + r * H + i));
    });
    rms_norm_kernel<scalar_t>(rp, H, weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, H, (float)eps);
  });
  return out;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include "simd_math.h"  // exp512: e^x, clamped to [-87, 88]

static inline __m512 bf16_to_f32(const c10::BFloat16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

// out = bf16(bf16(silu(gate)) * up) over gate_up rows [gate | up] of 2*I features, torch's two rounding points.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.stride(-1) == 1, "silu_mul: bf16 rows");
  const int64_t I = gate_up.size(-1) / 2;
  auto x2 = gate_up.reshape({-1, 2 * I});
  const int64_t rows = x2.size(0), stride = x2.stride(0);
  auto shape = gate_up.sizes().vec();
  shape.back() = I;
  auto out = torch::empty({rows, I}, gate_up.options());
  const c10::BFloat16* x = x2.data_ptr<c10::BFloat16>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const c10::BFloat16* g = x + r * stride;
      const c10::BFloat16* u = g + I;
      c10::BFloat16* orow = o + r * I;
      for (int64_t i = 0; i < I; i += 16) {
        const __mmask16 k = I - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (I - i)) - 1);
        const __m512 gv = bf16_to_f32(g + i, k);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        const __m512 s16 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s)), 16));
        const __m512 prod = _mm512_mul_ps(s16, bf16_to_f32(u + i, k));
        _mm256_mask_storeu_epi16(reinterpret_cast<void*>(orow + i), k, (__m256i)_mm512_cvtneps_pbh(prod));
      }
    }
  });
  return out.view(shape);
}
bool silu_mul_supported() { return true; }
#else
torch::Tensor silu_mul(torch::Tensor) { TORCH_CHECK(false, "built without AVX-512 BF16"); }
bool silu_mul_supported() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("rotary", &rotary);
  m.def("rope_store", &rope_store);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("silu_mul", &silu_mul);
  m.def("silu_mul_supported", &silu_mul_supported);
}
