#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

static constexpr int64_t KB = 16;  // keys per block
static constexpr int64_t QB = 16;  // query positions per work item
static constexpr int RB = 4;       // rows scored together: RB x SB independent accumulator chains
static constexpr int SB = 4;       // 16-key sub-blocks per softmax block (64 keys)

static inline __mmask16 lanes_below(int64_t n) {
  return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

#include "simd_math.h"  // exp512: e^x, clamped to [-87, 88] (callers mask lanes that should be 0)

// acc[r][s] = scores of rows r0..r0+RB-1 against the 16 keys of sub-block s (kt: the block's first sub-block)
template <int NS>
static inline void score_rows(__m512 (*acc)[SB], const uint16_t* qp, int64_t Hq, int64_t D, int64_t DH, int64_t h,
                              int64_t G, int64_t i0, int64_t r0, int64_t rows_here, const uint16_t* kt) {
  const int32_t* qr[RB];
  for (int r = 0; r < RB; ++r) {
    const int64_t row = r0 + r, g = row / QB, i = i0 + std::min<int64_t>(row % QB, rows_here - 1);
    qr[r] = reinterpret_cast<const int32_t*>(qp + (i * Hq + h * G + g) * D);
    for (int s = 0; s < SB; ++s) acc[r][s] = _mm512_setzero_ps();
  }
  __m512 a[RB][NS];
  for (int r = 0; r < RB; ++r)
    for (int s = 0; s < NS; ++s) a[r][s] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < DH; ++dp) {
    __m512bh k[NS];
#pragma GCC unroll 4
    for (int s = 0; s < NS; ++s) k[s] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(kt + s * KB * D + dp * KB * 2));
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const __m512bh q = (__m512bh)_mm512_set1_epi32(qr[r][dp]);
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) a[r][s] = _mm512_dpbf16_ps(a[r][s], q, k[s]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int s = 0; s < NS; ++s) acc[r][s] = a[r][s];
}

// q (Lq, Hq, D) bf16: query i sits at position q_start + i; caches (slots, Hkv, D) bf16; slots (ctx,) int64 with
// ctx = q_start + Lq; window <= 0: none. → (Lq, Hq, D) bf16.
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                                int64_t q_start, double scale_d, int64_t window) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16, "bf16 inputs");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  const int64_t Lq = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  const int64_t ctx = slots.size(0);
  TORCH_CHECK(ctx == q_start + Lq && D % 32 == 0 && D <= 256 && Hq % Hkv == 0, "unsupported shape");
  const int64_t G = Hq / Hkv, DH = D / 2, nkb = (ctx + KB - 1) / KB;
  const float scale = (float)scale_d;
  auto out = torch::empty_like(q);
  auto sl = slots.to(at::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const uint16_t* kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
  const uint16_t* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  // Kt[h][kb][DH][16][2], Vp[h][kb][8][D][2]: keys past ctx are zero
  std::vector<uint16_t> Kt(Hkv * nkb * KB * D, 0), Vp(Hkv * nkb * KB * D, 0);
  at::parallel_for(0, Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / nkb, kb = item % nkb;
      uint16_t* kt = Kt.data() + item * KB * D;
      uint16_t* vp = Vp.data() + item * KB * D;
      for (int64_t j = 0; j < KB && kb * KB + j < ctx; ++j) {
        const int64_t row = (sp[kb * KB + j] * Hkv + h) * D;
        const uint16_t* k = kc + row;
        const uint16_t* v = vc + row;
        for (int64_t d = 0; d < D; ++d) {
          kt[(d / 2) * KB * 2 + j * 2 + (d % 2)] = k[d];
          vp[(j / 2) * D * 2 + d * 2 + (j % 2)] = v[d];
        }
      }
    }
  });
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t nqb = (Lq + QB - 1) / QB;
  at::parallel_for(0, Hkv * nqb, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = G * QB;  // rows of an item: row r is query head h*G + r / QB at position i0 + r % QB
    std::vector<float> O(R * D), m(R), l(R);
    std::vector<uint32_t> P(R * (SB * KB / 2));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / nqb, i0 = (item % nqb) * QB;
      const int64_t rows_here = std::min<int64_t>(QB, Lq - i0);
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t last_pos = q_start + i0 + rows_here - 1;
      const int64_t first_key = window > 0 ? std::max<int64_t>(0, q_start + i0 - window + 1) : 0;
      // softmax blocks of SB sub-blocks of 16 keys: the per-row work (max, exp of the correction, sums, rescaling
      // the output) is paid once per 64 keys instead of once per 16
      for (int64_t b0 = first_key / KB; b0 * KB <= last_pos; b0 += SB) {
        const int64_t ns = std::min<int64_t>(SB, last_pos / KB + 1 - b0);  // sub-blocks up to the causal limit
        const uint16_t* kt = Kt.data() + (h * nkb + b0) * KB * D;
        const uint16_t* vp = Vp.data() + (h * nkb + b0) * KB * D;
        for (int64_t r0 = 0; r0 < R; r0 += RB) {
          __m512 acc[RB][SB];
          switch (ns) {
            case 1: score_rows<1>(acc, qp, Hq, D, DH, h, G, i0, r0, rows_here, kt); break;
            case 2: score_rows<2>(acc, qp, Hq, D, DH, h, G, i0, r0, rows_here, kt); break;
            case 3: score_rows<3>(acc, qp, Hq, D, DH, h, G, i0, r0, rows_here, kt); break;
            default: score_rows<4>(acc, qp, Hq, D, DH, h, G, i0, r0, rows_here, kt); break;
          }
          for (int r = 0; r < RB; ++r) {
            const int64_t row = r0 + r;
            if (row % QB >= rows_here) continue;
            const int64_t pos = q_start + i0 + row % QB;
            uint32_t* pr = P.data() + row * (SB * KB / 2);
            __mmask16 ok[SB];
            __m512 sv[SB];
            __m512 mx = _mm512_set1_ps(-INFINITY);
            bool any = false;
            for (int64_t sb = 0; sb < ns; ++sb) {
              const int64_t k0 = (b0 + sb) * KB;  // keys k0 + lane allowed: <= pos, > pos - window, < ctx
              const int64_t lo = window > 0 ? pos - window + 1 - k0 : 0;
              ok[sb] = lanes_below(pos + 1 - k0) & ~lanes_below(lo) & lanes_below(ctx - k0);
              sv[sb] = _mm512_mul_ps(acc[r][sb], _mm512_set1_ps(scale));
              mx = _mm512_mask_max_ps(mx, ok[sb], mx, sv[sb]);
              any |= ok[sb] != 0;
            }
            if (!any) {  // nothing of this block for this row
              std::memset(pr, 0, sizeof(uint32_t) * (SB * KB / 2));
              continue;
            }
            const float m_new = std::max(m[row], _mm512_reduce_max_ps(mx));
            const float corr = std::exp(m[row] - m_new);  // 0 on the first block (m = -inf)
            const __m512 mv = _mm512_set1_ps(m_new);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t sb = 0; sb < ns; ++sb) {
              const __m512 p = _mm512_maskz_mov_ps(ok[sb], exp512(_mm512_sub_ps(sv[sb], mv)));
              sum = _mm512_add_ps(sum, p);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + sb * (KB / 2)), (__m256i)_mm512_cvtneps_pbh(p));
            }
            l[row] = l[row] * corr + _mm512_reduce_add_ps(sum);
            m[row] = m_new;
            if (corr != 1.f) {
              float* o = O.data() + row * D;
              const __m512 c = _mm512_set1_ps(corr);
              for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), c));
            }
          }
        }
        // O[row] += P[row] . Vp over the block's key pairs; even and odd pairs in separate sums (more chains)
        const int64_t pairs = ns * (KB / 2);
        for (int64_t row = 0; row < R; ++row) {
          if (row % QB >= rows_here) continue;
          float* o = O.data() + row * D;
          const uint32_t* pr = P.data() + row * (SB * KB / 2);
          for (int64_t d0 = 0; d0 < D; d0 += 64) {
            const int64_t nv = std::min<int64_t>(4, (D - d0) / 16);
            __m512 a[4], b[4];
            for (int c = 0; c < 4; ++c) { a[c] = c < nv ? _mm512_loadu_ps(o + d0 + 16 * c) : _mm512_setzero_ps(); b[c] = _mm512_setzero_ps(); }
            for (int64_t j = 0; j < pairs; j += 2) {
              const __m512bh p0 = (__m512bh)_mm512_set1_epi32((int)pr[j]);
              const __m512bh p1 = (__m512bh)_mm512_set1_epi32((int)pr[j + 1]);
              const uint16_t* v0 = vp + j * D * 2 + d0 * 2;  // pair j of the block (sub-blocks are adjacent)
              const uint16_t* v1 = v0 + D * 2;
              for (int c = 0; c < nv; ++c) {
                a[c] = _mm512_dpbf16_ps(a[c], p0, (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(v0 + 32 * c)));
                b[c] = _mm512_dpbf16_ps(b[c], p1, (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(v1 + 32 * c)));
              }
            }
            for (int c = 0; c < nv; ++c) _mm512_storeu_ps(o + d0 + 16 * c, _mm512_add_ps(a[c], b[c]));
          }
        }
      }
      for (int64_t row = 0; row < R; ++row) {
        if (row % QB >= rows_here) continue;
        const int64_t g = row / QB, i = i0 + row % QB;
        const __m512 inv = _mm512_set1_ps(l[row] > 0.f ? 1.f / l[row] : 0.f);
        uint16_t* o = op + (i * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; d += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(O.data() + row * D + d), inv)));
      }
    }
  });
  return out;
}

bool supported() { return true; }
#else
torch::Tensor prefill_attention(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, double, int64_t) {
  TORCH_CHECK(false, "built without AVX-512 BF16");
}
bool supported() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefill_attention", &prefill_attention);
  m.def("supported", &supported);
}
