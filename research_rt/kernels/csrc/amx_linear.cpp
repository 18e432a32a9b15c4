// bfloat16 linear layers on Intel AMX tiles: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// Two loops, one result. Each output is the same chain of tile products (TDPBF16PS over 32 values of
// K) in the same order over K whatever M is and wherever its row sits; bfloat16 products are exact in
// float32 and a partial sum parked in memory comes back unchanged, so a row's bits do not depend on
// its batch or on the loop that computed it (tests/kernels/test_gemv.py checks both against 1 row).
//
// Decode batches (under kRowMajorMinRows rows): `run`. Batches past the gemv op's 16 rows went to
// oneDNN's GEMM, which reorders the weight into its blocked layout on every call: on the Xeon VM of
// RESULTS.md the batch-64 decode linears ran at 8-10 GB/s of weights (DRAM gives 14.5). Weights
// reordered once ran 1.5x faster, but a packed copy must follow every in-place edit of its weight, so
// `run` packs no weight. It computes the transposed product C^T = W X^T: the weight, row-major as the
// checkpoint stores it, is the tile multiply's A operand as is (a tile load takes 16 weight rows x 32
// values with the row stride), and X^T is the B operand, which TDPBF16PS wants as pairs along K. x is
// small next to w, so each call packs it once: tile (kb, mt) of `xp` holds, for the 16 k-pairs of K
// block kb and the 16 rows of M tile mt, the 32-bit pair (x[m, 2k], x[m, 2k + 1]) at [k][m]. Tiles:
// 0-3 accumulate C^T for up to four M tiles, 4 and 5 hold the weight rows of alternate K blocks, 6
// and 7 the packed input. Threads split the weight's 16-row blocks.
//
// Prefill rows (from kRowMajorMinRows): `run_row_major`, C = X W^T, a GEMM blocked for the caches.
// With many rows the weight is the small operand, so each call packs it into k-pairs (per thread, the
// blocks it owns) and x's rows are the A operand as they lie. C comes out row-major: no transposes in
// the epilogue (with C^T at 2048 rows transposing C tiles and packing x took ~1/3 of the samples).
// C is computed in blocks of kMcTiles M tiles x kNcBlocks weight blocks (256 x 256 floats, L2) over K
// in panels of kKc K blocks; within a panel each step is a 2 x 2 of tiles (two M tiles, 4 and 5, by
// two weight blocks, 6 and 7, into 0-3), so each tile loaded feeds two products and the weight panel
// (32 rows x 256 values, 16 KB) stays in L1 while the M tiles pass. SmolLM2's 120 layer linears
// (benchmarks.bench_linear_rows without the LM head) at 512 / 2048 rows: 1.3x / 1.45x faster than
// `run` (1.5 / 1.6 TFLOP/s on two threads; oneDNN's GEMM ~2, but its rows' bits depend on M).
#include "amx_linear.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define RESEARCH_RT_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace research_rt {

#ifdef RESEARCH_RT_AMX
namespace {

constexpr int kArchGetXcompPerm = 0x1022;  // arch_prctl codes (linux/arch/x86/include/uapi/asm/prctl.h)
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;
// Below, `run`, which packs no weight: SmolLM2's 120 layer linears at 64 rows 18.8 ms either way, at
// 96 / 128 rows 22.5 / 27.0 against run_row_major's 21.7 / 26.3; W2-style decode at batch 64 (64 x
// 256-token prompts, 64 steps) 4% faster with `run`, whose time perf had 16% in packing weights.
constexpr int64_t kRowMajorMinRows = 128;
constexpr int64_t kKc = 8;                // K blocks per panel
constexpr int64_t kMcTiles = 16;          // M tiles per C block
constexpr int64_t kNcBlocks = 16;         // weight blocks per C block (even)

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// `n_rows` weight rows in this block (16 but for the last block of N % 16 rows).
void configure_tiles(int n_rows) {
  TileConfig c;
  for (int t = 0; t < 6; ++t) c.rows[t] = n_rows, c.colsb[t] = 64;  // C^T 0-3 and the weight rows
  for (int t = 6; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;      // 16 k-pairs x 16 input rows
  _tile_loadconfig(&c);
}

// xp tile (kb, mt) = 16 k-pairs x 16 rows of 32-bit pairs, a transpose of x's block; rows past M
// are zeros. A decode batch's few tiles pack on the calling thread: a parallel region costs more
// than the microseconds they take.
void pack_input(const uint32_t* x, int64_t M, int64_t K, int64_t MT, uint32_t* xp) {
  const int64_t KB = K / 32, pairs = K / 2;
  at::parallel_for(0, KB, MT <= 4 ? KB : 8, [&](int64_t kb0, int64_t kb1) {
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      for (int64_t mt = 0; mt < MT; ++mt) {
        __m512i a[16];
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t m = mt * 16 + i;
          a[i] = m < M ? _mm512_loadu_si512(x + m * pairs + kb * 16) : _mm512_setzero_si512();
        }
        transpose16(a);
        uint32_t* tile = xp + (kb * MT + mt) * 256;
        for (int k = 0; k < 16; ++k) _mm512_storeu_si512(tile + k * 16, a[k]);
      }
    }
  });
}

// One K block: weight rows into tile A (a literal: GCC's tile intrinsics name registers by token),
// then each M tile's input pairs and its product.
#define RESEARCH_RT_TILE_STEP(A, w, w_stride, b) \
  do {                                            \
    _tile_loadd(A, w, w_stride);                  \
    _tile_loadd(6, b, 64);                        \
    _tile_dpbf16ps(0, A, 6);                      \
    if constexpr (G > 1) {                        \
      _tile_loadd(7, (b) + 256, 64);              \
      _tile_dpbf16ps(1, A, 7);                    \
    }                                             \
    if constexpr (G > 2) {                        \
      _tile_loadd(6, (b) + 512, 64);              \
      _tile_dpbf16ps(2, A, 6);                    \
    }                                             \
    if constexpr (G > 3) {                        \
      _tile_loadd(7, (b) + 768, 64);              \
      _tile_dpbf16ps(3, A, 7);                    \
    }                                             \
  } while (0)

// C^T for G (1-4) M tiles from mt0, over all of K, stored to cbuf [G][16 n][16 m]. Tiles are not
// renamed: the weight rows alternate between tiles 4 and 5 so the next K block's load overlaps this
// block's products (SmolLM2's batch-64 linears: 1.05x oneDNN's time with one tile, 0.77x with two),
// and the input tiles between 6 and 7. No software prefetch: fetching the next block's rows into L1
// (32 lines per two K blocks) held SmolLM2's 1-row linears to 15-16 GB/s of weights on the AMX VM of
// RESULTS.md (2026-12-08); the hardware prefetchers alone stream 20-22 GB/s (torch.sum: 22-25).
template <int G>
void tile_block(const uint16_t* w, int64_t w_stride, const uint32_t* xp, int64_t MT, int64_t mt0,
                int64_t KB, float* cbuf) {
  _tile_zero(0);
  if constexpr (G > 1) _tile_zero(1);
  if constexpr (G > 2) _tile_zero(2);
  if constexpr (G > 3) _tile_zero(3);
  int64_t kb = 0;
  for (; kb + 2 <= KB; kb += 2) {
    RESEARCH_RT_TILE_STEP(4, w + kb * 32, w_stride, xp + (kb * MT + mt0) * 256);
    RESEARCH_RT_TILE_STEP(5, w + kb * 32 + 32, w_stride, xp + ((kb + 1) * MT + mt0) * 256);
  }
  if (kb < KB) RESEARCH_RT_TILE_STEP(4, w + kb * 32, w_stride, xp + (kb * MT + mt0) * 256);
  _tile_stored(0, cbuf, 64);
  if constexpr (G > 1) _tile_stored(1, cbuf + 256, 64);
  if constexpr (G > 2) _tile_stored(2, cbuf + 512, 64);
  if constexpr (G > 3) _tile_stored(3, cbuf + 768, 64);
}

// out[m, n0 + i] = cbuf[t][i][m % 16] + bias, for the rows m < M of the G tiles from mt0: each C^T
// tile transposed in registers (vec_math.h's transpose16 on the float bits).
void write_rows(const float* cbuf, int G, int64_t mt0, int64_t M, int64_t N, int64_t n0, int n_rows,
                const float* bias, uint16_t* out) {
  const __mmask16 keep = n_rows == 16 ? (__mmask16)0xffff : (__mmask16)((1u << n_rows) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
  for (int t = 0; t < G; ++t) {
    __m512i a[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm512_load_si512(cbuf + t * 256 + i * 16);
    transpose16(a);  // a[i]: input row mt * 16 + i over the block's 16 weight rows
    for (int i = 0; i < 16; ++i) {
      const int64_t m = (mt0 + t) * 16 + i;
      if (m >= M) return;
      const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(a[i]), b);
      _mm256_mask_storeu_epi16(out + m * N + n0, keep, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// C for MP M tiles from mt (rows of x, stride K) x two packed weight blocks wa, wb, K blocks
// [kb0, kb1); c: [2 m][2 n][256] floats, each tile [16 m][16 n].
template <int MP>
void row_major_panel(const uint16_t* x, int64_t K, int64_t mt, const uint32_t* wa, const uint32_t* wb,
                     int64_t kb0, int64_t kb1, float* c) {
  const uint16_t* x0 = x + mt * 16 * K;
  const uint16_t* x1 = x0 + 16 * K;
  if (kb0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (MP > 1) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c, 64);
    _tile_loadd(1, c + 256, 64);
    if constexpr (MP > 1) {
      _tile_loadd(2, c + 512, 64);
      _tile_loadd(3, c + 768, 64);
    }
  }
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    _tile_loadd(4, x0 + kb * 32, K * 2);
    _tile_loadd(6, wa + kb * 256, 64);
    _tile_loadd(7, wb + kb * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (MP > 1) {
      _tile_loadd(5, x1 + kb * 32, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  if constexpr (MP > 1) {
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

// out[m0 + i, n0 + j] = c[j / 16][i][j % 16] + bias[n0 + j], rounded to bfloat16, for the two C tiles of
// a weight-block pair: each output row's 32 values are one cache line, stored at once (two half-line
// stores per row: SmolLM2's gate_up at 2048 rows 629 against 691 GFLOP/s on one thread).
void write_row_major(const float* c, int64_t m0, int64_t N, int64_t n0, const float* bias, uint16_t* out) {
  const __m512 b0 = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_loadu_ps(bias + n0 + 16) : _mm512_setzero_ps();
  for (int i = 0; i < 16; ++i) {
    const __m512 v0 = _mm512_add_ps(_mm512_load_ps(c + i * 16), b0);
    const __m512 v1 = _mm512_add_ps(_mm512_load_ps(c + 256 + i * 16), b1);
    _mm512_storeu_si512(out + (m0 + i) * N + n0, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
  }
}

// The first MT whole M tiles of x (row stride K), N % 32 == 0. Threads split pairs of weight blocks
// and pack theirs once. The parameters were measured on the AMX VM of RESULTS.md: kKc 4-48,
// kMcTiles 8-64 and kNcBlocks 8-16 all within 10%; prefetching x's next K block into L1: no gain.
void run_row_major(const uint16_t* w, const uint16_t* x, const float* bias, int64_t K, int64_t N,
                   int64_t MT, uint16_t* out) {
  const int64_t KB = K / 32, NP = N / 32, block_words = KB * 256;
  at::parallel_for(0, NP, 1, [&](int64_t p0, int64_t p1) {
    const int64_t blocks = 2 * (p1 - p0);
    std::unique_ptr<uint32_t, decltype(&std::free)> wp(
        static_cast<uint32_t*>(std::aligned_alloc(64, blocks * block_words * 4)), &std::free);
    // block b as pack_input packs one M tile: [kb][k-pair][weight row], the B operand's layout
    for (int64_t b = 0; b < blocks; ++b)
      pack_input(reinterpret_cast<const uint32_t*>(w + (2 * p0 + b) * 16 * K), 16, K, 1, wp.get() + b * block_words);
    const int64_t pairs_per_c = kNcBlocks / 2;
    std::unique_ptr<float, decltype(&std::free)> cblock(
        static_cast<float*>(std::aligned_alloc(64, pairs_per_c * kMcTiles * 512 * sizeof(float))), &std::free);
    configure_tiles(16);
    for (int64_t mc = 0; mc < MT; mc += kMcTiles) {
      const int64_t mc_end = std::min(MT, mc + kMcTiles), mcn = mc_end - mc;
      for (int64_t pc = p0; pc < p1; pc += pairs_per_c) {
        const int64_t pc_end = std::min(p1, pc + pairs_per_c);
        for (int64_t kb0 = 0; kb0 < KB; kb0 += kKc) {
          const int64_t kb1 = std::min(KB, kb0 + kKc);
          for (int64_t p = pc; p < pc_end; ++p) {
            const uint32_t* wa = wp.get() + 2 * (p - p0) * block_words;
            float* c = cblock.get() + (p - pc) * mcn * 512;
            for (int64_t mt = mc; mt < mc_end; mt += 2) {
              if (mt + 1 < mc_end) row_major_panel<2>(x, K, mt, wa, wa + block_words, kb0, kb1, c + (mt - mc) * 512);
              else row_major_panel<1>(x, K, mt, wa, wa + block_words, kb0, kb1, c + (mt - mc) * 512);
            }
          }
        }
        for (int64_t p = pc; p < pc_end; ++p)
          for (int64_t mt = mc; mt < mc_end; ++mt) {
            const float* t = cblock.get() + (p - pc) * mcn * 512 + (mt - mc) * 512;
            write_row_major(t, mt * 16, N, 32 * p, bias, out);
          }
      }
    }
    _tile_release();
  });
}

void run(const uint16_t* w, const uint32_t* xp, const float* bias, int64_t M, int64_t K, int64_t N,
         int64_t MT, uint16_t* out) {
  const int64_t KB = K / 32, NB = (N + 15) / 16;
  at::parallel_for(0, NB, 1, [&](int64_t nb0, int64_t nb1) {
    alignas(64) float cbuf[4 * 256];
    int rows = 16;
    configure_tiles(rows);
    for (int64_t mc = 0; mc < MT; mc += kMcTiles) {  // a chunk of xp stays in L2 while w streams
      const int64_t mc_end = std::min(MT, mc + kMcTiles);
      for (int64_t nb = nb0; nb < nb1; ++nb) {
        const int n_rows = static_cast<int>(std::min<int64_t>(16, N - nb * 16));
        if (n_rows != rows) configure_tiles(rows = n_rows);
        const uint16_t* wb = w + nb * 16 * K;
        for (int64_t mt0 = mc; mt0 < mc_end; mt0 += 4) {
          const int G = static_cast<int>(std::min<int64_t>(4, mc_end - mt0));
          switch (G) {
            case 1: tile_block<1>(wb, K * 2, xp, MT, mt0, KB, cbuf); break;
            case 2: tile_block<2>(wb, K * 2, xp, MT, mt0, KB, cbuf); break;
            case 3: tile_block<3>(wb, K * 2, xp, MT, mt0, KB, cbuf); break;
            default: tile_block<4>(wb, K * 2, xp, MT, mt0, KB, cbuf); break;
          }
          write_rows(cbuf, G, mt0, M, N, nb * 16, n_rows, bias, out);
        }
      }
    }
    _tile_release();
  });
}

}  // namespace

bool amx_available() {
  static const bool granted = [] {
    unsigned long features = 0;
    if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &features) != 0) return false;
    if (features & (1ul << kXfeatureXtiledata)) return true;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias) {
  TORCH_CHECK(amx_linear_supported(x, w), "amx_linear: bfloat16 x [M, K], w [N, K], K % 32 == 0, AMX");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(!bias || bias->numel() == N, "amx_linear: bias of ", N, " values expected");
  at::Tensor b;
  if (bias) b = bias->to(x.scalar_type()).to(at::kFloat).contiguous();  // as the gemv loop rounds it
  at::Tensor out = at::empty({M, N}, x.options());
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  const auto* wr = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  const auto* xr = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  int64_t done = 0;  // rows computed by the row-major path (whole M tiles)
  if (M >= kRowMajorMinRows && N % 32 == 0) {
    run_row_major(wr, xr, bp, K, N, M / 16, op);
    done = M / 16 * 16;
  }
  if (done < M) {  // the rest (a decode batch, or the last rows of a prefill) as C^T
    const int64_t rest = M - done, RT = (rest + 15) / 16;
    at::Tensor xp = at::empty({K / 32 * RT * 256}, x.options().dtype(at::kInt));
    pack_input(reinterpret_cast<const uint32_t*>(xr + done * K), rest, K, RT,
               reinterpret_cast<uint32_t*>(xp.data_ptr()));
    run(wr, reinterpret_cast<const uint32_t*>(xp.data_ptr()), bp, rest, K, N, RT, op + done * N);
  }
  return out;
}

#else  // no AMX in this build

bool amx_available() { return false; }

at::Tensor amx_linear(const at::Tensor&, const at::Tensor&, const at::Tensor*) {
  TORCH_CHECK(false, "amx_linear: this build has no AMX");
}

#endif

bool amx_linear_supported(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.dim() == 2 &&
         w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) % 32 == 0 && x.size(0) > 0 &&
         x.device().is_cpu() && w.device().is_cpu() && amx_available();
}

}  // namespace research_rt

namespace {
at::Tensor amx_linear_op(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return research_rt::amx_linear(x, w, bias.has_value() ? &*bias : nullptr);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("amx_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("amx_linear_available() -> bool", &research_rt::amx_available);
}

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("amx_linear", &amx_linear_op); }
