// bfloat16 linear layers for decode on AVX512-BF16: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// The weight is packed once into panels of 32 output columns: panel p holds, for each k-pair kk, the
// 32-bit pairs (w[n, 2kk], w[n, 2kk + 1]) of its columns n = 32p .. 32p + 31 side by side, so one
// 64-byte load gives 16 columns' pairs and VDPBF16PS multiplies them by one input row's pair
// (x[m, 2kk], x[m, 2kk + 1]) broadcast to every lane: an outer product, each lane one output's float32
// sum. A tile of up to 12 input rows x 32 columns keeps its 24 sums in registers over all of K, with
// 2 weight loads and 12 broadcasts per 24 VDPBF16PS and no horizontal sums at the end. Each output is
// the same chain over k-pairs, in order, whatever the number of rows and wherever its row sits, so a
// row's bits do not depend on its batch. Threads split the panels; a panel (K x 64 bytes) stays in L2
// while the row tiles pass over it, so the weight streams from memory once a call.
//
// SmolLM2-135M's 121 linears, weights from DRAM, 2 threads, Zen 5, alternating with the kernels this
// replaced (benchmarks/bench_linear_rows.py, RESULTS.md): 64 rows 54-66 ms against 73-77 ms for 2 x 4
// dot-product tiles (oneDNN with prepacked weights 53-72 ms); 8 rows 13 against 26-31 ms; 1 row
// 9.7-9.9 against 11.2-11.8 ms for the dot-product stream.
//
// The packed copy is kept per weight (`packed_weight`), made on its first call and made again when the
// weight's storage, data pointer, shape or version counter (bumped by every in-place op on it or
// its views) changes, or after `research_rt::forget_packed_weights()` (the loader and the weight
// updates call it: writes through `.data` bypass the version counter).
#include "panel_linear.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace research_rt {
namespace {

std::atomic<int64_t> g_epoch{0};   // bumped by forget_packed_weights: every packed copy is stale
std::atomic<int64_t> g_packs{0};   // packed copies made so far (tests check that decode reuses them)

#if defined(__AVX512BF16__)
constexpr int64_t kPanelCols = 32;  // output columns per panel: two vectors of float32 sums
constexpr int kTileRows = 12;       // input rows per register tile: 12 x 2 sums
// rows a thread takes through all its panels before the next rows: their inputs stay in L2 (without
// it 2048 rows streamed every panel's inputs from L3: SmolLM2's linears 1527 ms against oneDNN's 1461)
constexpr int64_t kRowBlock = 240;

// [P, ceil(K / 2), 32, 2]: w's columns in panels of 32, each k-pair's 32 pairs contiguous; padded
// with zero columns to a whole panel and a zero value after an odd K.
at::Tensor pack(const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t P = (N + kPanelCols - 1) / kPanelCols, Kp = (K + 1) / 2;
  at::Tensor padded = at::zeros({P * kPanelCols, 2 * Kp}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  g_packs.fetch_add(1);
  return padded.view({P, kPanelCols, Kp, 2}).permute({0, 2, 1, 3}).contiguous();
}

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // held weakly: a freed storage expires the entry
  std::vector<int64_t> sizes;
  int64_t version, epoch;
  at::Tensor packed;
};

std::mutex g_mutex;
std::unordered_map<const void*, Entry> g_cache;  // by the weight's data pointer

int64_t version_of(const at::Tensor& w) { return w.is_inference() ? -1 : static_cast<int64_t>(w._version()); }

at::Tensor packed_weight(const at::Tensor& w) {
  if (!w.is_contiguous()) return pack(w.contiguous());  // a temporary: not worth keeping
  const int64_t epoch = g_epoch.load(), version = version_of(w);
  c10::StorageImpl* storage = w.storage().unsafeGetStorageImpl();
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto it = g_cache.find(w.data_ptr());
  if (it != g_cache.end()) {
    const Entry& e = it->second;
    if (!e.storage.expired() && e.storage._unsafe_get_target() == storage && e.version == version &&
        e.epoch == epoch && e.sizes == w.sizes().vec())
      return e.packed;
    g_cache.erase(it);
  }
  for (auto i = g_cache.begin(); i != g_cache.end();)  // drop the copies of freed weights
    i = i->second.storage.expired() ? g_cache.erase(i) : std::next(i);
  Entry e{c10::weak_intrusive_ptr<c10::StorageImpl>(w.storage().getWeakStorageImpl()), w.sizes().vec(),
          version, epoch, pack(w)};
  return g_cache.emplace(w.data_ptr(), std::move(e)).first->second.packed;
}

// Rows [0, R) of x (row stride K) times one panel: the 32 columns' sums, plus bias, rounded as
// c10::BFloat16 rounds, stored to out (row stride N) for the panel's `cols` real columns.
template <int R>
void panel_tile(const uint16_t* x, int64_t K, const uint32_t* panel, const float* bias, uint16_t* out,
                int64_t N, int64_t cols) {
  __m512 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t kk = 0; kk < pairs; ++kk) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + kk * kPanelCols);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + kk * kPanelCols + 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(x + r * K + 2 * kk)));
      a[r][0] = _mm512_dpbf16_ps(a[r][0], xb, w0);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], xb, w1);
    }
  }
  if (K % 2) {  // the last value alone, paired with zero (as the packed weight is)
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + pairs * kPanelCols);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + pairs * kPanelCols + 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * K + K - 1]));
      a[r][0] = _mm512_dpbf16_ps(a[r][0], xb, w0);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], xb, w1);
    }
  }
  const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
  for (int r = 0; r < R; ++r) store32_bf16(out + r * N, _mm512_add_ps(a[r][0], b0), _mm512_add_ps(a[r][1], b1), cols);
}

template <int R = kTileRows>
void panel_rows(int64_t rows, const uint16_t* x, int64_t K, const uint32_t* panel, const float* bias,
                uint16_t* out, int64_t N, int64_t cols) {
  if constexpr (R > 0) {
    if (rows == R) return panel_tile<R>(x, K, panel, bias, out, N, cols);
    panel_rows<R - 1>(rows, x, K, panel, bias, out, N, cols);
  }
}
#endif

}  // namespace

bool panel_linear_supported(const at::Tensor& x, const at::Tensor& w) {
#if defined(__AVX512BF16__)
  return x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.dim() == 2 && w.dim() == 2;
#else
  (void)x, (void)w;
  return false;
#endif
}

at::Tensor panel_linear(const at::Tensor& x_, const at::Tensor& w, const at::Tensor* bias) {
#if defined(__AVX512BF16__)
  const at::Tensor x = x_.contiguous();
  const at::Tensor packed = packed_weight(w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), P = packed.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  std::vector<float> b(P * kPanelCols, 0.f);  // added always, as the row loop adds 0.f without bias
  if (bias) {
    const at::Tensor bf = bias->to(at::kFloat).contiguous();
    std::copy(bf.data_ptr<float>(), bf.data_ptr<float>() + N, b.begin());
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint32_t* pp = reinterpret_cast<const uint32_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t panel_pairs = packed.size(1) * kPanelCols;  // 32-bit pairs a panel
  at::parallel_for(0, P, 2, [&](int64_t p0, int64_t p1) {
    for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
      const int64_t r1 = std::min(M, r0 + kRowBlock);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t cols = std::min(kPanelCols, N - p * kPanelCols);
        for (int64_t m = r0; m < r1; m += kTileRows)
          panel_rows(std::min<int64_t>(kTileRows, r1 - m), xp + m * K, K, pp + p * panel_pairs,
                     b.data() + p * kPanelCols, op + m * N + p * kPanelCols, N, cols);
      }
    }
  });
  return out;
#else
  (void)x_, (void)w, (void)bias;
  TORCH_CHECK(false, "panel_linear: this build has no AVX512-BF16");
#endif
}

}  // namespace research_rt

namespace {
void forget_packed_weights() { research_rt::g_epoch.fetch_add(1); }
int64_t packed_weight_count() { return research_rt::g_packs.load(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("forget_packed_weights() -> ()", &forget_packed_weights);
  m.def("packed_weight_count() -> int", &packed_weight_count);
}
