// research_rt::argmax_rows(x [B, V] float32) -> [B] int64: the index of each row's largest value,
// the first one on ties, the first NaN where a row has one: torch.argmax(x, -1) exactly, for the
// greedy sampler. torch's CPU argmax took 3.5 ms on W2's [64, 49152] logits per decode step while an
// amax over them took 0.29 ms (benchmarks/RESULTS.md, 2026-12-06); this reads each row once with
// AVX-512, the rows shared among threads. Other CPUs and dtypes: the caller uses torch.argmax.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace research_rt {
namespace {

// The first index of the row's largest value (or of its first NaN), one scalar pass
int64_t argmax_scalar(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

#if defined(__AVX512F__)
int64_t argmax_row(const float* x, int64_t n) {
  if (n < 16) return argmax_scalar(x, n);
  // lane l keeps the largest of x[l], x[l + 16], ... and the first index where it was seen
  __m512 best = _mm512_loadu_ps(x);
  __m512i where = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i idx = where;
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
  int64_t i = 16;
  for (; i + 16 <= n; i += 16) {
    idx = _mm512_add_epi32(idx, step);
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strictly greater: earlier wins ties
    best = _mm512_mask_mov_ps(best, gt, v);
    where = _mm512_mask_mov_epi32(where, gt, idx);
  }
  if (nan) return argmax_scalar(x, n);
  alignas(64) float bv[16];
  alignas(64) int32_t bi[16];
  _mm512_store_ps(bv, best);
  _mm512_store_si512(bi, where);
  int64_t arg = bi[0];
  float top = bv[0];
  for (int l = 1; l < 16; ++l)
    if (bv[l] > top || (bv[l] == top && bi[l] < arg)) top = bv[l], arg = bi[l];
  for (; i < n; ++i) {  // the tail
    if (std::isnan(x[i])) return i;
    if (x[i] > top) top = x[i], arg = i;
  }
  return arg;
}
#else
int64_t argmax_row(const float* x, int64_t n) { return argmax_scalar(x, n); }
#endif

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0, "argmax_rows takes [B, V] float32, V > 0");
  TORCH_CHECK(x.size(1) <= INT32_MAX, "argmax_rows: rows longer than 2^31");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* src = xc.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  const int64_t n = x.size(1);
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) dst[r] = argmax_row(src + r * n, n);
  });
  return out;
}

}  // namespace
}  // namespace research_rt

TORCH_LIBRARY_FRAGMENT(research_rt, m) { m.def("argmax_rows(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("argmax_rows", &research_rt::argmax_rows); }
