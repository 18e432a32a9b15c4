// research_rt::extend_attention: causal attention of a prefill (extend) batch straight over the
// token-level KV pool, for bfloat16 and float32 on CPUs with AVX512-BF16 (flash attention's online
// softmax).
//
//   q [T, H, D]; k_buf, v_buf [S, KVH, D] (the pool, this step's keys already written);
//   kv_indices [B, Lk] int64 (request b's j-th key is in slot kv_indices[b, j]);
//   prefix_lens, extend_lens [B] int64  ->  out [T, H * D]
//
// Request b's queries are the q rows from sum(extend_lens[:b]) on; its query i sits at position
// prefix_lens[b] + i and sees keys 0 .. prefix_lens[b] + i. No padded copy of keys or queries.
//
// A work item is one request, one KV head and up to 64 / G consecutive positions (its G query heads
// x positions are the lanes of up to four vectors; extend_attention_kernel.h), the causal mask applies
// on diagonal blocks only, and threads take the longest items first. `products` picks the inner
// products: 0 this CPU's (fastest_products), 1 VDPBF16PS on bfloat16 pairs, 2 float32 FMAs, 3 AMX
// tiles for the scores (where the CPU has them). A float32 pool takes the float32 FMAs (0 or 2).
// Output is rounded to the dtype once. A row's bits depend only on its request's keys up to its own
// position, taken in blocks of 32 from key 0: the same alone, in any batch, and whatever chunk or
// cached prefix the position arrives in. Any other dtype, head size or CPU: the op reports false and
// the caller runs scaled_dot_product_attention (research_rt/executor/attention/torch_native.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "extend_attention_kernel.h"

namespace research_rt {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BF16__)

using extend::Item;
using extend::kRows;
using extend::Problem;
using extend::Products;

bool extend_attention_avx512(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                             const at::Tensor& idx, const at::Tensor& prefix, const at::Tensor& extend,
                             double scale, int64_t products, at::Tensor& out) {
  const int64_t D = q.size(2), H = q.size(1), KVH = k_buf.size(1), G = H / KVH;
  const bool f32 = q.scalar_type() == at::kFloat;
  if ((!f32 && q.scalar_type() != at::kBFloat16) || G > kRows || !extend::head_dim_supported(D)) return false;
  const int64_t B = idx.size(0);
  std::vector<int64_t> q_start(B + 1, 0);
  const int64_t* pre = prefix.data_ptr<int64_t>();
  const int64_t* ext = extend.data_ptr<int64_t>();
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    q_start[b + 1] = q_start[b] + ext[b];
    extend::add_items(items, b, ext[b], pre[b], G, KVH);
  }
  TORCH_CHECK(q_start[B] == q.size(0), "extend_lens must sum to q's rows");
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const Problem p{H, D, KVH, G, idx.size(1), k_buf.stride(0), k_buf.stride(1),
                  q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), idx.data_ptr<int64_t>(), pre, q_start.data(),
                  out.data_ptr(), static_cast<float>(scale)};
  extend::run_items(p, items, products, f32);
  return true;
}

#else
bool extend_attention_avx512(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, double, int64_t, at::Tensor&) {
  return false;
}
#endif

// The products `products=0` runs on this CPU: 1 bfloat16 pairs, 2 float32, 3 tiles (0: the op does not
// run here).
int64_t extend_attention_products() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const Products p = extend::fastest_products();
  return p == Products::kPairs ? 1 : p == Products::kFloat ? 2 : 3;
#else
  return 0;
#endif
}

// Whether products=3 (AMX tiles) runs here
bool extend_attention_tiles() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return extend::tiles_supported();
#else
  return false;
#endif
}

// Whether this build runs the op for this dtype and head size (else the caller uses SDPA).
bool extend_attention_supported(at::ScalarType dtype, int64_t head_dim) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return (dtype == at::kBFloat16 || dtype == at::kFloat) && extend::head_dim_supported(head_dim);
#else
  (void)dtype;
  (void)head_dim;
  return false;
#endif
}

at::Tensor extend_attention(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                            const at::Tensor& kv_indices, const at::Tensor& prefix_lens,
                            const at::Tensor& extend_lens, double scale, int64_t products) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3, "q, k_buf, v_buf must be 3-d");
  TORCH_CHECK(q.scalar_type() == k_buf.scalar_type() && k_buf.scalar_type() == v_buf.scalar_type(),
              "q, k_buf and v_buf must share a dtype");
  TORCH_CHECK(k_buf.sizes() == v_buf.sizes() && k_buf.strides() == v_buf.strides(), "k_buf and v_buf must have one layout");
  TORCH_CHECK(k_buf.stride(2) == 1, "k_buf rows must be contiguous");
  TORCH_CHECK(q.size(1) % k_buf.size(1) == 0 && q.size(2) == k_buf.size(2), "q and the pool disagree on heads");
  TORCH_CHECK(kv_indices.dim() == 2 && kv_indices.scalar_type() == at::kLong, "kv_indices must be [B, Lk] int64");
  TORCH_CHECK(prefix_lens.scalar_type() == at::kLong && extend_lens.scalar_type() == at::kLong &&
                  prefix_lens.numel() == kv_indices.size(0) && extend_lens.numel() == kv_indices.size(0),
              "prefix_lens and extend_lens must be [B] int64");
  TORCH_CHECK(extend_attention_supported(q.scalar_type(), q.size(2)),
              "extend_attention: this build covers bfloat16 and float32 with head_dim 32, 64 or 128 on AVX512-BF16");
  auto out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  const auto qc = q.contiguous(), idx = kv_indices.contiguous();
  const auto pre = prefix_lens.contiguous(), ext = extend_lens.contiguous();
  TORCH_CHECK(products >= 0 && products <= 3,
              "products must be 0 (auto), 1 (bfloat16 pairs), 2 (float32) or 3 (AMX tiles)");
  TORCH_CHECK(products != 3 || extend_attention_tiles(), "products=3: no AMX tiles on this CPU or build");
  TORCH_CHECK(q.scalar_type() != at::kFloat || products == 0 || products == 2,
              "a float32 pool takes products 0 or 2 (float32 FMAs)");
  TORCH_CHECK(extend_attention_avx512(qc, k_buf, v_buf, idx, pre, ext, scale, products, out),
              "extend_attention: unsupported");
  return out;
}

}  // namespace
}  // namespace research_rt

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("extend_attention(Tensor q, Tensor k_buf, Tensor v_buf, Tensor kv_indices, Tensor prefix_lens, Tensor extend_lens, float scale, int products=0) -> Tensor");
  m.def("extend_attention_supported(ScalarType dtype, int head_dim) -> bool", &research_rt::extend_attention_supported);
  m.def("extend_attention_products() -> int", &research_rt::extend_attention_products);
}

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("extend_attention", &research_rt::extend_attention); }
