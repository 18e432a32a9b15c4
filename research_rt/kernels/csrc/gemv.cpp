// Matrix-vector products for decode on CPU: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// research_rt::gemv(x [M, K], w [N, K], bias [N] or None) -> [M, N] in x's dtype. With few rows
// (a single stream, a small batch, a speculative verify of 5 tokens) a linear layer is bound by
// reading its weight once from memory, so this loop must stream w at memory bandwidth. Each thread
// takes a contiguous range of output rows and walks them one weight row at a time, front to back: a
// single sequential stream per thread is what the hardware prefetcher follows best (interleaving
// four weight rows, to reuse each load of x, ran at 26 GB/s on the LM head against 46 GB/s for one
// row at a time; benchmarks/RESULTS.md). Each weight row is loaded once for up to kMaxRows input
// rows. Measured on SmolLM2-135M's linears in bfloat16 (2 threads, RESULTS.md): 8.5 ms for one row,
// 9.2 ms for five, 13.6 ms for eight, against oneDNN's 17.8 / 20.8 / 22.4 ms; past kStreamMaxRows
// rows (two passes) the op runs bfloat16 on AVX512-BF16 as 2 x 4 tiles of dot products up to 64 rows
// (tile_linear below, batch 1's bits) and hands the rest to oneDNN's GEMM. bfloat16 uses AVX512-BF16's pairwise dot
// product (VDPBF16PS: 32 products per instruction, float32 accumulation); float32 uses AVX-512
// FMAs; other CPUs use a plain loop for the vectorizer.
//
// On CPUs with AMX, bfloat16 up to kAmxMaxRows rows goes to the tile kernel instead (amx_linear.cpp).
// SmolLM2-135M's 121 linears streamed from DRAM per step, Xeon VM, 2 threads, one process
// (RESULTS.md, "AMX tiles for the decode linears"): 12.4 / 15.1 / 13.2 / 14.9 ms at 1 / 2 / 5 / 16 rows
// against this loop's 15.7 / 17.8 / 25.0 / 52.0 ms (VDPBF16PS issues at a quarter of the FMA rate
// there) and oneDNN's 20.7 / 21.0 / 21.2 / 21.9 ms; 64 rows 23.1 ms against oneDNN's 29.4. Each row's
// bits stay the same at any row count, as with this loop.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "amx_linear.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrain = 64;  // at least this many output rows per thread
constexpr int64_t kMaxRows = 8;         // input rows per pass over the weight (16 accumulators in registers)
constexpr int64_t kStreamMaxRows = 16;  // more rows: tile_linear or at::linear (oneDNN's GEMM)
// Where AMX runs bfloat16: up to 128 rows (with weights from DRAM the tile kernel and oneDNN were
// even at 96-128 rows; past that oneDNN's blocking reaches twice the kernel's ~1 TFLOP/s).
constexpr int64_t kAmxMaxRows = 128;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Dot products of one weight row with R input rows, each accumulated in float32. The weight is
// loaded once for all R rows; every row's products and sums run in the same order whatever R is
// (two accumulators over 32- or 64-wide steps, a masked tail into the first, one final reduction),
// so a row's result is bit-identical at any batch size: batch 1 and a 5-row verify agree.
template <int R>
inline void dots(const float* w, const float* const* x, int64_t K, float* out) {
#if defined(__AVX512F__)
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r] + k), a0[r]);
      a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r] + k + 16), a1[r]);
    }
  }
  for (; k < K; k += 16) {  // the tail: masked loads read zeros past K
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    const __m512 w0 = _mm512_maskz_loadu_ps(m, w + k);
    for (int r = 0; r < R; ++r) a0[r] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x[r] + k), a0[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#else
  for (int r = 0; r < R; ++r) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) acc += w[k] * x[r][k];
    out[r] = acc;
  }
#endif
}

template <int R>
inline void dots(const at::BFloat16* wt, const at::BFloat16* const* xt, int64_t K, float* out) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wt);
#if defined(__AVX512BF16__)
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
    for (int r = 0; r < R; ++r) {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(xt[r]);
      a0[r] = _mm512_dpbf16_ps(a0[r], w0, (__m512bh)_mm512_loadu_si512(x + k));
      a1[r] = _mm512_dpbf16_ps(a1[r], w1, (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
    const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, w + k);
    for (int r = 0; r < R; ++r) {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(xt[r]);
      a0[r] = _mm512_dpbf16_ps(a0[r], w0, (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#else
  for (int r = 0; r < R; ++r) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(xt[r]);
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) acc += bf16_to_float(w[k]) * bf16_to_float(x[k]);
    out[r] = acc;
  }
#endif
}

// Output rows [n0, n1) for input rows [m0, m0 + R): the weight rows stream once for all R.
template <int R, typename T>
void rows_kernel(const T* xp, const T* wp, const T* bp, T* op, int64_t m0, int64_t K, int64_t N,
                 int64_t n0, int64_t n1) {
  const T* x[R];
  for (int r = 0; r < R; ++r) x[r] = xp + (m0 + r) * K;
  float v[R];
  for (int64_t n = n0; n < n1; ++n) {
    dots<R>(wp + n * K, x, K, v);
    const float b = bp ? static_cast<float>(bp[n]) : 0.f;
    for (int r = 0; r < R; ++r) op[(m0 + r) * N + n] = static_cast<T>(v[r] + b);
  }
}

template <typename T>
void gemv_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M;) {  // groups of up to kMaxRows input rows, one weight pass each
      const int64_t r = std::min<int64_t>(M - m, kMaxRows);
      switch (r) {
        case 1: rows_kernel<1>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 2: rows_kernel<2>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 3: rows_kernel<3>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 4: rows_kernel<4>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 5: rows_kernel<5>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 6: rows_kernel<6>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 7: rows_kernel<7>(xp, wp, bp, op, m, K, N, n0, n1); break;
        default: rows_kernel<8>(xp, wp, bp, op, m, K, N, n0, n1); break;
      }
      m += r;
    }
  });
}

#if defined(__AVX512BF16__)
// bfloat16 for 17 to 64 rows without AMX (a decode batch): tiles of 2 input rows x 4 weight rows,
// each of their 8 dot products in two accumulators over all of K (the row loop's a0 / a1 schedule
// above: 12 loads feed 16 VDPBF16PS per 64-wide step, where the loop waits on loads and one
// horizontal sum per output), then summed by one transpose-and-add tree that adds the lanes in
// _mm512_reduce_add_ps's order, with the bias added and rounded as the loop does: each output has the
// bits batch 1 gives it, so a request's greedy tokens do not depend on the batch it decodes in. Each
// thread owns a range of weight rows: a block of 4 stays in L1 while every input tile passes over it,
// so the weight streams from memory once (the next block prefetched meanwhile). Tails reuse the last
// row (computed twice, stored once). SmolLM2-135M's 121 linears, bfloat16, AMD EPYC Zen 5 (2 threads;
// benchmarks/bench_linear_rows.py, RESULTS.md): 1.3-1.8x oneDNN's per-call GEMM at 32-64 rows.
constexpr int64_t kTileMinRows = kStreamMaxRows + 1;  // fewer rows keep the loop above
constexpr int64_t kTileMaxRows = 64;  // past 64 oneDNN's GEMM blocks better (128 rows: even)

// Lanes 0-7 of the result: the 16-lane sums of v[0..7], each added in _mm512_reduce_add_ps's order
// (lane l with l + 8, then with l + 4, l + 2, l + 1), so they equal its results bit for bit.
inline __m512 reduce8_in_order(const __m512* v) {
  __m512 w[4], x[2];
  for (int j = 0; j < 4; ++j)  // [v2j lo256 + hi256 | v2j+1 lo256 + hi256]
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  for (int j = 0; j < 2; ++j)  // 128-bit lane L: v[4j + L]'s partials p_l + p_l+4
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0xDD));
  const __m512d a = _mm512_castps_pd(x[0]), b = _mm512_castps_pd(x[1]);
  // lane L: [v[L] q0 + q2, q1 + q3, v[4 + L] q0 + q2, q1 + q3]
  const __m512 y = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  // lane L: [sum v[L], sum v[4 + L], ..]; gathered to lanes 0-7 = v[0..7]
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y, y, 0x88), _mm512_shuffle_ps(y, y, 0xDD));
  return _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 13, 9, 5, 1, 12, 8, 4, 0), z);
}

// Lane 4i + j (i < 2, j < 4): x row i . w row j, as rows_kernel<R> computes it
inline __m512 tile_block(const uint16_t* const* x, const uint16_t* const* w, int64_t K) {
  __m512 a0[8], a1[8];
  for (int t = 0; t < 8; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512bh w0[4], w1[4];
    for (int j = 0; j < 4; ++j) {
      w0[j] = (__m512bh)_mm512_loadu_si512(w[j] + k);
      w1[j] = (__m512bh)_mm512_loadu_si512(w[j] + k + 32);
    }
    for (int i = 0; i < 2; ++i) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x[i] + k), x1 = (__m512bh)_mm512_loadu_si512(x[i] + k + 32);
      for (int j = 0; j < 4; ++j) {
        a0[4 * i + j] = _mm512_dpbf16_ps(a0[4 * i + j], w0[j], x0);
        a1[4 * i + j] = _mm512_dpbf16_ps(a1[4 * i + j], w1[j], x1);
      }
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
    for (int j = 0; j < 4; ++j) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w[j] + k);
      for (int i = 0; i < 2; ++i)
        a0[4 * i + j] = _mm512_dpbf16_ps(a0[4 * i + j], wv, (__m512bh)_mm512_maskz_loadu_epi16(m, x[i] + k));
    }
  }
  for (int t = 0; t < 8; ++t) a0[t] = _mm512_add_ps(a0[t], a1[t]);
  return reduce8_in_order(a0);
}

at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const at::BFloat16* bp = bias ? bias->data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, (N + 3) / 4, kGrain / 4, [&](int64_t b0, int64_t b1) {
    alignas(64) float sums[16];
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = 4 * nb;
      const uint16_t* wr[4];
      alignas(64) float b8[16] = {};
      for (int j = 0; j < 4; ++j) {
        wr[j] = wp + std::min(n0 + j, N - 1) * K;
        b8[j] = b8[4 + j] = bp ? static_cast<float>(bp[std::min(n0 + j, N - 1)]) : 0.f;
      }
      const __m512 bias8 = _mm512_load_ps(b8);  // added always, as the loop adds 0.f without bias
      const bool full_cols = n0 + 4 <= N;
      // the next block's weight rows (contiguous) requested while this one's tiles run: a share of
      // its cache lines per input tile
      const char* next = reinterpret_cast<const char*>(wp + std::min(n0 + 4, N - 1) * K);
      const int64_t next_lines = (std::min<int64_t>(4, std::max<int64_t>(N - n0 - 4, 0)) * K * 2 + 63) / 64;
      const int64_t tiles = (M + 1) / 2;
      for (int64_t m0 = 0; m0 < M; m0 += 2) {
        for (int64_t l = (m0 / 2) * next_lines / tiles; l < (m0 / 2 + 1) * next_lines / tiles; ++l)
          _mm_prefetch(next + 64 * l, _MM_HINT_T0);
        const uint16_t* xr[2] = {xp + m0 * K, xp + std::min(m0 + 1, M - 1) * K};
        const __m512 v = _mm512_add_ps(tile_block(xr, wr, K), bias8);
        if (full_cols && m0 + 2 <= M) {  // rounded to nearest even in one instruction, 4 per store
          alignas(32) uint64_t rows[4];
          _mm256_store_si256(reinterpret_cast<__m256i*>(rows), (__m256i)_mm512_cvtneps_pbh(v));
          std::memcpy(op + m0 * N + n0, rows, 8);
          std::memcpy(op + (m0 + 1) * N + n0, rows + 1, 8);
          continue;
        }
        _mm512_storeu_ps(sums, v);
        for (int i = 0; i < 2 && m0 + i < M; ++i)
          for (int j = 0; j < 4 && n0 + j < N; ++j) op[(m0 + i) * N + n0 + j] = static_cast<at::BFloat16>(sums[4 * i + j]);
      }
    }
  });
  return out;
}
#endif

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemv: x and w must have one dtype");
  if (x.size(0) <= kAmxMaxRows && research_rt::amx_linear_supported(x, w)) {
    return research_rt::amx_linear(x, w, bias.has_value() ? &*bias : nullptr);
  }
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->to(x.scalar_type()).contiguous();
  const at::Tensor* bptr = bias.has_value() ? &bc : nullptr;
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16 && x.size(0) >= kTileMinRows && x.size(0) <= kTileMaxRows)
    return tile_linear(xc, wc, bptr);
#endif
  if (x.size(0) > kStreamMaxRows) return at::linear(x, w, bias);
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    gemv_kernel<at::BFloat16>(xc, wc, bptr, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "gemv: float32 or bfloat16, got ", x.scalar_type());
    gemv_kernel<float>(xc, wc, bptr, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(research_rt, m) { m.def("gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("gemv", &gemv); }
