// Math shared by the CPU kernels: scalar casts, then the AVX-512 vector helpers.
#pragma once

#include <c10/util/BFloat16.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace research_rt {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
// v rounded to T and back: the value a cast to T leaves
template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

}  // namespace research_rt

#if defined(__AVX512F__)
#include <immintrin.h>

namespace research_rt {

// 16 consecutive elements as float32 (bfloat16, or its raw bits as uint16_t, widened exactly)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const c10::BFloat16* p) { return load16(reinterpret_cast<const uint16_t*>(p)); }

// 16 float32 values to bfloat16 bits, rounded to nearest even as c10::BFloat16 does (denormals and
// NaN kept, NaN as 0x7fc0; VCVTNEPS2BF16 would flush denormals), and stores that round the same way
inline __m256i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// 32 float32 values (lo, hi) rounded as bf16_bits does, stored to out's first `cols` (<= 32) values:
// one output row of a 32-column panel (panel_linear.cpp, q4_linear.cpp)
inline void store32_bf16(uint16_t* out, __m512 lo, __m512 hi, int64_t cols) {
  const __mmask16 m0 = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  _mm256_mask_storeu_epi16(out, m0, bf16_bits(lo));
  _mm256_mask_storeu_epi16(out + 16, m1, bf16_bits(hi));
}
// the two 16-bit values at p as one 32-bit word (a bfloat16 pair to broadcast to every lane)
inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v));
}
// v as a cast to T leaves it (float32: unchanged)
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) return v;
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(v)), 16));
}

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
