// 4-bit weight-only linear layers on AVX512-BF16 (`--torchao-config int4wo-<group>`), every row count:
// out[m, n] = sum_k x[m, k] * w[n, k] with w[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g], q in 0..15,
// one bfloat16 scale s and offset z per group g of `group` consecutive k (the form ATen's
// `_weight_int4pack_mm_for_cpu` computes; on a Q4_0 / Q4_1 GGUF these are the file's own codes).
//
// Layout (models/layers/packed_weight.py packs it): output columns in panels of 32; for each 8
// consecutive k ("octet"), one 32-bit word per column holding its 8 codes, k = 0, 2, 4, 6 in the low
// half's nibbles and k = 1, 3, 5, 7 in the high half's, so `(word >> 4p) & 0x000f000f` puts the codes
// of k-pair p in the two 16-bit halves. OR-ing 0x4300 into each half makes the bfloat16 value
// 128 + q exactly (0x4300 is 128.0; in [128, 256) the 7 mantissa bits count units), and VDPBF16PS
// multiplies such pairs by an input row's pair broadcast to all lanes: an outer product, one float32
// sum per column, as in panel_linear.cpp. A group's sum T = sum (128 + q) x then gives
// sum w x = s * (T - 136 * X) + z * X, X the group's sum of x. The scales: [panels, groups, 32]
// words, s in the low and z in the high 16 bits.
//
// Per weight this reads 0.5 bytes of codes and 4 / group of scales (0.625 at group 32) against
// bfloat16's 2: single-stream decode is bound by reading the weights, and ATen's int4 kernel was
// compute-bound at 2 threads here (benchmarks/RESULTS.md).
#include "vec_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

#if defined(__AVX512BF16__)
constexpr int64_t kPanelCols = 32;
constexpr int kTileRows = 2;  // rows per register tile: 2 x 4 x 2 group sums and 2 x 2 totals

// The pairs `q4_tile` multiplies by for k-pair p of an octet: (word >> 4p) & 0x000f000f | 0x43004300,
// VPTERNLOGD with (A & B) | C = 0xEA.
inline __m512i q4_pairs(__m512i word, int p) {
  return _mm512_ternarylogic_epi32(_mm512_srli_epi32(word, 4 * p), _mm512_set1_epi32(0x000f000f),
                                   _mm512_set1_epi32(0x43004300), 0xEA);
}

// A panel's codes [K / 8, 32] as the bfloat16 pairs q4_tile multiplies by, [K / 8, 4, 32]: batches of
// more than one tile decode each panel once instead of once per tile (the shifts and VPTERNLOGDs
// shared VDPBF16PS's port: 1.35x the bfloat16 panel kernel's time at 8-1024 rows, 2 threads).
void q4_decode_panel(const uint32_t* codes, int64_t octets, uint32_t* pairs) {
  for (int64_t o = 0; o < octets; ++o)
    for (int h = 0; h < 2; ++h) {
      const __m512i w = _mm512_loadu_si512(codes + o * kPanelCols + 16 * h);
      for (int p = 0; p < 4; ++p) _mm512_storeu_si512(pairs + (o * 4 + p) * kPanelCols + 16 * h, q4_pairs(w, p));
    }
}

// Rows [0, R) of x (row stride K; `xsum` their groups' sums, row stride G) times one panel. Each
// k-pair position p of an octet sums into its own register (4 chains a column vector: one chain
// waited on VDPBF16PS's latency, 22 GB/s of codes at one row).
// `Decoded`: `codes` holds q4_decode_panel's pairs, not the packed words; the arithmetic is the same.
template <int R, bool Decoded>
void q4_tile(const uint16_t* x, int64_t K, int64_t group, const uint32_t* codes, const uint32_t* scales,
             const float* xsum, int64_t G, uint16_t* out, int64_t N, int64_t cols) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t octets = group / 8;
  for (int64_t g = 0; g < G; ++g) {
    __m512 t[R][4][2];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < 4; ++p) t[r][p][0] = t[r][p][1] = _mm512_setzero_ps();
    for (int64_t o = 0; o < octets; ++o) {
      const int64_t k0 = g * group + 8 * o;
      __m512i w0, w1;
      if constexpr (!Decoded) {
        const uint32_t* c = codes + (g * octets + o) * kPanelCols;
        w0 = _mm512_loadu_si512(c), w1 = _mm512_loadu_si512(c + 16);
      }
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        __m512bh b0, b1;
        if constexpr (Decoded) {
          const uint32_t* d = codes + ((g * octets + o) * 4 + p) * kPanelCols;
          b0 = (__m512bh)_mm512_loadu_si512(d), b1 = (__m512bh)_mm512_loadu_si512(d + 16);
        } else {
          b0 = (__m512bh)q4_pairs(w0, p), b1 = (__m512bh)q4_pairs(w1, p);
        }
        for (int r = 0; r < R; ++r) {
          const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(research_rt::load_pair(x + r * K + k0 + 2 * p)));
          t[r][p][0] = _mm512_dpbf16_ps(t[r][p][0], xb, b0);
          t[r][p][1] = _mm512_dpbf16_ps(t[r][p][1], xb, b1);
        }
      }
    }
    const uint32_t* sz = scales + g * kPanelCols;
    __m512 s[2], z[2];
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_loadu_si512(sz + 16 * h);
      s[h] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      z[h] = _mm512_castsi512_ps(_mm512_and_si512(v, high_half));
    }
    for (int r = 0; r < R; ++r) {
      // fused by hand, no product feeds an add: GCC contracts such pairs (-ffp-contract=fast) where it
      // likes, which could give a row other bits in a tile of 1 than in a tile of 2
      const __m512 X = _mm512_set1_ps(xsum[r * G + g]);
      for (int h = 0; h < 2; ++h) {
        const __m512 T = _mm512_add_ps(_mm512_add_ps(t[r][0][h], t[r][1][h]), _mm512_add_ps(t[r][2][h], t[r][3][h]));
        acc[r][h] = _mm512_fmadd_ps(s[h], _mm512_fnmadd_ps(X, _mm512_set1_ps(136.f), T), acc[r][h]);
        acc[r][h] = _mm512_fmadd_ps(z[h], X, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) research_rt::store32_bf16(out + r * N, acc[r][0], acc[r][1], cols);
}

template <bool Decoded, int R = kTileRows>
void q4_rows(int64_t rows, const uint16_t* x, int64_t K, int64_t group, const uint32_t* codes,
             const uint32_t* scales, const float* xsum, int64_t G, uint16_t* out, int64_t N, int64_t cols) {
  if constexpr (R > 0) {
    if (rows == R) return q4_tile<R, Decoded>(x, K, group, codes, scales, xsum, G, out, N, cols);
    q4_rows<Decoded, R - 1>(rows, x, K, group, codes, scales, xsum, G, out, N, cols);
  }
}
#endif

bool q4_linear_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// x [M, K] bfloat16; codes [P, K / 8, 32] int32; scales [P, K / group, 32] int32 -> [M, N] bfloat16
at::Tensor q4_linear(const at::Tensor& x_, const at::Tensor& codes, const at::Tensor& scales, int64_t group,
                     int64_t N) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kBFloat16, "q4_linear: x must be [M, K] bfloat16");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = K / group, P = codes.size(0);
  TORCH_CHECK(group % 8 == 0 && K % group == 0, "q4_linear: K must be a multiple of the group, a multiple of 8");
  TORCH_CHECK(codes.is_contiguous() && codes.scalar_type() == at::kInt && codes.dim() == 3 &&
                  codes.size(1) == K / 8 && codes.size(2) == kPanelCols && P == (N + kPanelCols - 1) / kPanelCols,
              "q4_linear: codes must be [ceil(N / 32), K / 8, 32] int32");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kInt &&
                  scales.sizes() == at::IntArrayRef({P, G, kPanelCols}),
              "q4_linear: scales must be [ceil(N / 32), K / group, 32] int32");
  at::Tensor out = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<float> xsum(M * G);  // each group's sum of x, in order
  for (int64_t i = 0; i < M * G; ++i) {
    float v = 0.f;
    for (int64_t k = 0; k < group; ++k) v += static_cast<float>(c10::BFloat16(xp[i * group + k], c10::BFloat16::from_bits()));
    xsum[i] = v;
  }
  const uint32_t* cp = reinterpret_cast<const uint32_t*>(codes.data_ptr());
  const uint32_t* sp = reinterpret_cast<const uint32_t*>(scales.data_ptr());
  const float* xs = xsum.data();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, P, 2, [&](int64_t p0, int64_t p1) {
    std::vector<uint32_t> pairs(M > kTileRows ? K / 2 * kPanelCols : 0);  // one decoded panel
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(kPanelCols, N - p * kPanelCols);
      const uint32_t* panel = cp + p * (K / 8) * kPanelCols;
      if (!pairs.empty()) q4_decode_panel(panel, K / 8, pairs.data());
      for (int64_t m = 0; m < M; m += kTileRows) {
        const int64_t rows = std::min<int64_t>(kTileRows, M - m);
        uint16_t* o = op + m * N + p * kPanelCols;
        if (pairs.empty())
          q4_rows<false>(rows, xp + m * K, K, group, panel, sp + p * G * kPanelCols, xs + m * G, G, o, N, cols);
        else
          q4_rows<true>(rows, xp + m * K, K, group, pairs.data(), sp + p * G * kPanelCols, xs + m * G, G, o, N, cols);
      }
    }
  });
  return out;
#else
  (void)x_, (void)codes, (void)scales, (void)group, (void)N;
  TORCH_CHECK(false, "q4_linear: this build has no AVX512-BF16");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("q4_linear_supported() -> bool", &q4_linear_supported);
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scales, int group, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("q4_linear", &q4_linear); }
