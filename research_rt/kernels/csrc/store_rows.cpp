// Writing a forward's new K or V rows into the token pool, for eager CPU prefill:
//   research_rt::store_rows(buf [S, ...], slots [T], rows [T, ...]) : buf[slots[t]] = rows[t]
// what `buf.index_copy_(0, slots, rows)` does, as one memcpy per row. ATen's index_copy_ walks the
// rows element by element through its indexing loop: 34 us for a 512-token chunk of SmolLM2's K
// (3 heads x 64, bfloat16) into a pool whose pages are mapped, against 5 us here (2 threads, AMD EPYC
// Zen 5; RESULTS.md), twice a layer in every prefill chunk. Any dtype; slots are checked against the
// pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace research_rt {
namespace {

void store_rows(at::Tensor& buf, const at::Tensor& slots, const at::Tensor& rows) {
  TORCH_CHECK(buf.dim() >= 1 && buf.is_contiguous(), "store_rows: a contiguous pool buffer");
  TORCH_CHECK(slots.dim() == 1 && rows.dim() == buf.dim() && rows.size(0) == slots.size(0),
              "store_rows: one slot per row");
  TORCH_CHECK(rows.scalar_type() == buf.scalar_type(), "store_rows: rows in the pool's dtype");
  for (int64_t d = 1; d < buf.dim(); ++d)
    TORCH_CHECK(rows.size(d) == buf.size(d), "store_rows: rows shaped like the pool's rows");
  const at::Tensor idx = slots.to(at::kLong).contiguous();
  const at::Tensor src = rows.contiguous();
  const int64_t n = idx.size(0), S = buf.size(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(ip[t] >= 0 && ip[t] < S, "store_rows: slot ", ip[t], " outside the pool's [0, ", S, ")");
  const int64_t bytes = src.numel() == 0 ? 0 : src.nbytes() / n;
  const char* from = static_cast<const char*>(src.data_ptr());
  char* to = static_cast<char*>(buf.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) std::memcpy(to + ip[t] * bytes, from + t * bytes, bytes);
  });
}

}  // namespace
}  // namespace research_rt

TORCH_LIBRARY_FRAGMENT(research_rt, m) { m.def("store_rows(Tensor(a!) buf, Tensor slots, Tensor rows) -> ()"); }

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("store_rows", &research_rt::store_rows); }
