// C++ helpers shared by several of Loom's CPU kernels. Each kernel is its own extension, compiled from one text:
// build.kernel_source() splices this file's text into each kernel source that includes it.
#ifndef LOOM_SIMD_MATH_H
#define LOOM_SIMD_MATH_H

#if defined(__AVX512F__)
#include <immintrin.h>

// e^x on 16 floats: 2^n * p(r), n = round(x / ln 2), |rel. error| < 2e-7 (torch's Sleef expf: 1 ulp). x is clamped to
// [-87, 88]: below, ~1e-38 instead of 0 (callers mask such lanes), above, ~1.6e38 instead of inf.
static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
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
#endif  // __AVX512F__

#endif  // LOOM_SIMD_MATH_H
