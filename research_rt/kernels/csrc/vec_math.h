// Vector math shared by the AVX-512 kernels.
#pragma once

#if defined(__AVX512F__)
#include <c10/util/BFloat16.h>
#include <cstdint>
#include <immintrin.h>

namespace research_rt {

// 16 consecutive elements as float32 (bfloat16, or its raw bits as uint16_t, widened exactly)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const c10::BFloat16* p) { return load16(reinterpret_cast<const uint16_t*>(p)); }

// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
// error ~1e-7 there), times 2^n by VSCALEFPS. Lanes below -87.3 give ~1e-38 (callers mask them).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// a[j][i] <- a[i][j] for 16 x 16 32-bit values in 16 registers: pairs of rows, then quads, then
// 128-bit lanes across row quads (column 4L + k ends in register 4L + k).
inline void transpose16(__m512i a[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + k]: column 4L + k of rows 4i .. 4i + 3, in each lane L
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i w0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
    const __m512i w2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
    const __m512i w3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
    a[k] = _mm512_shuffle_i32x4(w0, w2, 0x88);
    a[4 + k] = _mm512_shuffle_i32x4(w1, w3, 0x88);
    a[8 + k] = _mm512_shuffle_i32x4(w0, w2, 0xDD);
    a[12 + k] = _mm512_shuffle_i32x4(w1, w3, 0xDD);
  }
}

// Lane t of the result = the sum of v[t]'s 16 lanes. A transpose-and-add tree: 45 shuffles and
// adds for 16 sums, where one horizontal sum each (_mm512_reduce_add_ps) costs ~8 dependent ops.
[[gnu::always_inline]] inline __m512 sum16(const __m512* v) {
  __m512 w[8], x[4];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    w[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the lane's sums of v[4j .. 4j+3]
    const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
    x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xdd));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xdd));
}

}  // namespace research_rt
#endif
