"""Causal attention for prompt chunks on CPUs with AVX-512 BF16, read from the paged KV cache: a small C++ kernel.

torch's CPU SDPA (flash) kernel in bf16 runs a 256-token prompt at ~50-100 GFLOP/s on the bench model's heads
(2.4 ms per layer and prompt on 2 Zen 4 cores, 17% of a prefill step), and a chunk that continues a prompt first
has to gather its keys and values out of the cache. This kernel is FlashAttention's loop with `vdpbf16ps`:

- once per call, each KV head's keys are packed per block of 16 keys as (d pairs × 16 keys × 2) and its values as
  (key pairs × D × 2), straight from the cache slots, so that both products are bf16 dot products whose second
  operand is one 64-byte load;
- a work item is a KV head and 16 query positions (its G query heads: G × 16 rows); for each block of keys up to
  the causal limit, scores for 8 rows at a time, an online softmax (running max and sum per row; FlashAttention
  rounds the probabilities to bf16 for the second product, and so does this), then probabilities × values into
  fp32 row sums.

Sliding windows (keys with q - k < window) are supported; logit soft-capping is not (Gemma 2 keeps its own path).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from loom.layers.kernels.build import cpu_flags, load_kernel

_SOURCE = r"""
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
static constexpr int RB = 8;       // rows scored together (independent accumulator chains)

static inline __mmask16 lanes_below(int64_t n) {
  return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// e^x for x <= 0, 2^n * p(r), |rel. error| < 2e-7; x below -87 gives ~1e-38 (callers mask such lanes to 0)
static inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
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
    std::vector<uint32_t> P(R * (KB / 2));
    std::vector<int32_t> qrow_ok(R);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / nqb, i0 = (item % nqb) * QB;
      const int64_t rows_here = std::min<int64_t>(QB, Lq - i0);
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t last_pos = q_start + i0 + rows_here - 1;
      const int64_t first_key = window > 0 ? std::max<int64_t>(0, q_start + i0 - window + 1) : 0;
      for (int64_t kb = first_key / KB; kb * KB <= last_pos; ++kb) {
        const uint16_t* kt = Kt.data() + (h * nkb + kb) * KB * D;
        const uint16_t* vp = Vp.data() + (h * nkb + kb) * KB * D;
        for (int64_t r0 = 0; r0 < R; r0 += RB) {
          __m512 acc[RB];
          const int32_t* qr[RB];
          for (int r = 0; r < RB; ++r) {
            const int64_t row = r0 + r, g = row / QB, i = i0 + std::min<int64_t>(row % QB, rows_here - 1);
            qr[r] = reinterpret_cast<const int32_t*>(qp + (i * Hq + h * G + g) * D);
            acc[r] = _mm512_setzero_ps();
          }
          for (int64_t dp = 0; dp < DH; ++dp) {
            const __m512bh k = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(kt + dp * KB * 2));
#pragma GCC unroll 8
            for (int r = 0; r < RB; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(qr[r][dp]), k);
          }
          for (int r = 0; r < RB; ++r) {
            const int64_t row = r0 + r;
            if (row % QB >= rows_here) continue;
            const int64_t pos = q_start + i0 + row % QB;
            // keys kb*16 + lane allowed: <= pos, > pos - window, < ctx
            int64_t lo = window > 0 ? pos - window + 1 - kb * KB : 0;
            const __mmask16 ok = lanes_below(pos + 1 - kb * KB) & ~lanes_below(lo) & lanes_below(ctx - kb * KB);
            uint32_t* pr = P.data() + row * (KB / 2);
            if (!ok) {  // nothing of this block for this row
              std::memset(pr, 0, sizeof(uint32_t) * (KB / 2));
              continue;
            }
            const __m512 s = _mm512_mul_ps(acc[r], _mm512_set1_ps(scale));
            const float bm = _mm512_mask_reduce_max_ps(ok, s);
            const float m_new = std::max(m[row], bm);
            const float corr = std::exp(m[row] - m_new);  // 0 on the first block (m = -inf)
            const __m512 p = _mm512_maskz_mov_ps(ok, exp_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
            l[row] = l[row] * corr + _mm512_reduce_add_ps(p);
            m[row] = m_new;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr), (__m256i)_mm512_cvtneps_pbh(p));
            if (corr != 1.f) {
              float* o = O.data() + row * D;
              const __m512 c = _mm512_set1_ps(corr);
              for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), c));
            }
          }
        }
        // O[row] += P[row] (8 key pairs) . Vp (pairs x D x 2), two rows at a time
        for (int64_t row = 0; row < R; ++row) {
          if (row % QB >= rows_here) continue;
          float* o = O.data() + row * D;
          const uint32_t* pr = P.data() + row * (KB / 2);
          for (int64_t d0 = 0; d0 < D; d0 += 64) {
            const int64_t nv = std::min<int64_t>(4, (D - d0) / 16);
            __m512 a[4];
            for (int c = 0; c < nv; ++c) a[c] = _mm512_loadu_ps(o + d0 + 16 * c);
            for (int64_t j = 0; j < KB / 2; ++j) {
              const __m512bh pp = (__m512bh)_mm512_set1_epi32((int)pr[j]);
              const uint16_t* vrow = vp + j * D * 2 + d0 * 2;
              for (int c = 0; c < nv; ++c)
                a[c] = _mm512_dpbf16_ps(a[c], pp, (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(vrow + 32 * c)));
            }
            for (int c = 0; c < nv; ++c) _mm512_storeu_ps(o + d0 + 16 * c, a[c]);
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
"""


@cache
def load() -> ModuleType | None:
    """The compiled kernel on an x86 CPU with AVX-512 F/BW and BF16, else None."""
    if not {"avx512f", "avx512bw", "avx512_bf16"} <= cpu_flags():
        return None
    module = load_kernel("loom_prefill_attention_cpu_v1", _SOURCE)
    return module if module is not None and module.supported() else None


def applies(q: torch.Tensor, head_dim: int, softcap: float | None) -> bool:
    """Whether the kernel serves this layer's prompt chunks (bf16 on a CPU that has it, head size a multiple of 32
    up to 256, no soft-capping)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and softcap is None and head_dim % 32 == 0
            and head_dim <= 256 and load() is not None)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      q_start: int, scale: float, window: int | None) -> torch.Tensor:
    """q (Lq, Hq, D) at positions q_start.., keys/values of positions 0..q_start+Lq-1 in the caches at `slots`."""
    module = load()
    assert module is not None
    return module.prefill_attention(q.contiguous(), k_cache, v_cache, slots, q_start, scale, window or -1)
