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
//
// Two flavours of the same arithmetic. VDPBF16PS is defined (Intel SDM) as two float32 FMAs per lane,
// the odd element's product first, denormal inputs read as zero and denormal results flushed, each
// rounded to nearest even. `Fma` runs exactly that with FMAs on x in float32 (`xf`, row stride 2 *
// ceil(K / 2), zero-padded) and the weight pairs split by a mask and a shift, with MXCSR's DAZ and FTZ
// set: on Intel Xeons (family 6 model 207 here) VDPBF16PS issues at about half the FMA rate, and 1920
// rows of SmolLM2's layer linears ran 1.7x faster (252-281 against 151-165 GFLOP/s, 2 threads,
// 2026-12-07; W2 prefill 76% of its samples in these tiles, at ~275 GFLOP/s).
// `fma_tiles_match` checks at first use that both flavours give the same bits on this CPU; only then
// does a call mix them.
template <int R>
[[gnu::always_inline]] inline void panel_sums(const uint16_t* x, int64_t K, const uint32_t* panel, __m512 (&a)[R][2]);

template <int R, bool Fma>
void panel_tile(const uint16_t* x, const float* xf, int64_t K, const uint32_t* panel, const float* bias,
                uint16_t* out, int64_t N, int64_t cols) {
  __m512 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  if constexpr (Fma) {
    const int64_t pairs = (K + 1) / 2, stride = 2 * pairs;
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    for (int64_t kk = 0; kk < pairs; ++kk) {
      const __m512i w0 = _mm512_loadu_si512(panel + kk * kPanelCols);
      const __m512i w1 = _mm512_loadu_si512(panel + kk * kPanelCols + 16);
      const __m512 odd0 = _mm512_castsi512_ps(_mm512_and_si512(w0, high));
      const __m512 odd1 = _mm512_castsi512_ps(_mm512_and_si512(w1, high));
      for (int r = 0; r < R; ++r) {
        const __m512 xo = _mm512_set1_ps(xf[r * stride + 2 * kk + 1]);
        a[r][0] = _mm512_fmadd_ps(xo, odd0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(xo, odd1, a[r][1]);
      }
      const __m512 even0 = _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16));
      const __m512 even1 = _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16));
      for (int r = 0; r < R; ++r) {
        const __m512 xe = _mm512_set1_ps(xf[r * stride + 2 * kk]);
        a[r][0] = _mm512_fmadd_ps(xe, even0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(xe, even1, a[r][1]);
      }
    }
  } else {
    panel_sums<R>(x, K, panel, a);
  }
  const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
  for (int r = 0; r < R; ++r) store32_bf16(out + r * N, _mm512_add_ps(a[r][0], b0), _mm512_add_ps(a[r][1], b1), cols);
}

// The VDPBF16PS flavour of panel_tile's sums: rows [0, R) of x (row stride K) into a (inlined: the
// sums stay in registers).
template <int R>
[[gnu::always_inline]] inline void panel_sums(const uint16_t* x, int64_t K, const uint32_t* panel, __m512 (&a)[R][2]) {
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
}

template <bool Fma, int R = kTileRows>
void panel_rows(int64_t rows, const uint16_t* x, const float* xf, int64_t K, const uint32_t* panel,
                const float* bias, uint16_t* out, int64_t N, int64_t cols) {
  if constexpr (R > 0) {
    if (rows == R) return panel_tile<R, Fma>(x, xf, K, panel, bias, out, N, cols);
    panel_rows<Fma, R - 1>(rows, x, xf, K, panel, bias, out, N, cols);
  }
}

// Row blocks of x through the panels [p0, p1): each thread's share of a call.
template <bool Fma>
void panel_block(int64_t p0, int64_t p1, int64_t M, const uint16_t* xp, const float* xf, int64_t K,
                 const uint32_t* pp, int64_t panel_pairs, const float* b, uint16_t* op, int64_t N) {
  const int64_t xf_stride = 2 * ((K + 1) / 2);
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t r1 = std::min(M, r0 + kRowBlock);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(kPanelCols, N - p * kPanelCols);
      for (int64_t m = r0; m < r1; m += kTileRows)
        panel_rows<Fma>(std::min<int64_t>(kTileRows, r1 - m), xp + m * K, xf + m * xf_stride, K,
                        pp + p * panel_pairs, b + p * kPanelCols, op + m * N + p * kPanelCols, N, cols);
    }
  }
}

// MXCSR's flush-to-zero and denormals-are-zero for the FMA flavour, restored on leaving the scope.
struct FlushDenormals {
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
};

at::Tensor xf_of(const at::Tensor& x) {  // float32 x, rows zero-padded to an even length
  const int64_t K = x.size(1);
  if (K % 2 == 0) return x.to(at::kFloat);
  at::Tensor xf = at::empty({x.size(0), K + 1}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, K).copy_(x);
  xf.narrow(1, K, 1).zero_();
  return xf;
}

at::Tensor run_panels(const at::Tensor& x, const at::Tensor& packed, const float* b, int64_t N, bool fma);

// Whether the two flavours give the same bits here: products and sums of mixed magnitudes, exact
// cancellations, denormal inputs and results. Computed once.
bool fma_tiles_match() {
  static const bool match = [] {
    const int64_t M = kTileRows + 1, K = 67, N = 40;  // no random generator: a user's seed stays as it was
    const at::Tensor i = at::arange(M * K, at::TensorOptions().dtype(at::kFloat)).view({M, K});
    at::Tensor x = at::sin(i * 0.7f) * at::pow(2.0, at::remainder(i * 7, 61) - 30);
    at::Tensor w = at::cos(at::arange(N * K, at::TensorOptions().dtype(at::kFloat)).view({N, K}) * 1.3f);
    x.index_put_({0}, x.index({1}).neg());
    w.index_put_({3}, 1e-39);  // denormal weights
    x.index_put_({2}, 1e-20);  // denormal products
    x = x.to(at::kBFloat16), w = w.to(at::kBFloat16);
    const at::Tensor packed = pack(w);
    std::vector<float> zero(packed.size(0) * kPanelCols, 0.f);
    return at::equal(run_panels(x, packed, zero.data(), N, true), run_panels(x, packed, zero.data(), N, false));
  }();
  return match;
}

// From this many rows on, CPUs that issue VDPBF16PS slower than FMAs take the FMA flavour.
constexpr int64_t kFmaMinRows = 16;
bool prefer_fma_tiles() {
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
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
  const int64_t M = x.size(0), N = w.size(0), P = packed.size(0);
  std::vector<float> b(P * kPanelCols, 0.f);  // added always, as the row loop adds 0.f without bias
  if (bias) {
    const at::Tensor bf = bias->to(at::kFloat).contiguous();
    std::copy(bf.data_ptr<float>(), bf.data_ptr<float>() + N, b.begin());
  }
  return run_panels(x, packed, b.data(), N, M >= kFmaMinRows && prefer_fma_tiles() && fma_tiles_match());
#else
  (void)x_, (void)w, (void)bias;
  TORCH_CHECK(false, "panel_linear: this build has no AVX512-BF16");
#endif
}

#if defined(__AVX512BF16__)
namespace {
at::Tensor run_panels(const at::Tensor& x, const at::Tensor& packed, const float* b, int64_t N, bool fma) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  const at::Tensor xf = fma ? xf_of(x) : at::Tensor();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const float* xfp = fma ? xf.data_ptr<float>() : nullptr;
  const uint32_t* pp = reinterpret_cast<const uint32_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t panel_pairs = packed.size(1) * kPanelCols;  // 32-bit pairs a panel
  at::parallel_for(0, packed.size(0), 2, [&](int64_t p0, int64_t p1) {
    if (fma) {
      FlushDenormals flush;
      panel_block<true>(p0, p1, M, xp, xfp, K, pp, panel_pairs, b, op, N);
    } else {
      panel_block<false>(p0, p1, M, xp, xfp, K, pp, panel_pairs, b, op, N);
    }
  });
  return out;
}
}  // namespace
#endif

}  // namespace research_rt

namespace {
void forget_packed_weights() { research_rt::g_epoch.fetch_add(1); }
bool panel_fma_tiles() {  // whether batches of research_rt::kFmaMinRows and more take FMA tiles here
#if defined(__AVX512BF16__)
  return research_rt::prefer_fma_tiles() && research_rt::fma_tiles_match();
#else
  return false;
#endif
}
int64_t packed_weight_count() { return research_rt::g_packs.load(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("forget_packed_weights() -> ()", &forget_packed_weights);
  m.def("packed_weight_count() -> int", &packed_weight_count);
  m.def("panel_fma_tiles() -> bool", &panel_fma_tiles);
}
