// CPU implementations of fusedattn::decode_fwd and fusedattn::merge_attention_states: argument
// checks, the split-count heuristic and output allocation; the arithmetic is in decode_kernel.cpp.
// The Python wrappers (fusedattn/decode.py) validate first with ValueErrors that name the
// argument; these TORCH_CHECKs make direct torch.ops.fusedattn calls (and compiled graphs, where
// the wrappers skip the value checks) just as safe: no index the kernel follows (cache_seqlens,
// block_table, cache_batch_idx) can point outside its tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/decode.h"

namespace fusedattn::cpu {
namespace {

constexpr int64_t MAX_SPLITS = 1024;  // = decode_kernel.cpp's MAX_MERGE_STATES
// The heuristic aims at this many tasks per thread, so that dynamic scheduling can even out
// sequences of different lengths.
constexpr int64_t TASKS_PER_THREAD = 2;
// Below this many keys per split, writing and merging the partial states costs more than the
// extra parallelism gains.
constexpr int64_t MIN_KEYS_PER_SPLIT = 512;

InDtype in_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return InDtype::kFloat32;
    case at::kBFloat16: return InDtype::kBFloat16;
    case at::kHalf: return InDtype::kFloat16;
    default:
      TORCH_CHECK(false, "fusedattn (cpu): ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fusedattn (cpu): ", name, " must be a CPU tensor, got device ", t.device());
}

void check_int32_vector(const at::Tensor& t, const char* name, int64_t B) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kInt, "fusedattn (cpu): ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "fusedattn (cpu): ", name, " must have shape (B,) = (", B,
              ",), got ", t.sizes());
}

// (B, Lnew, Hkv, dim) rows to append, in the cache's dtype.
void check_new_rows(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t B, int64_t Lnew,
                    int64_t Hkv, int64_t dim) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "fusedattn (cpu): ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == Lnew && t.size(2) == Hkv && t.size(3) == dim,
              "fusedattn (cpu): ", name, " must have shape (B, Lnew, Hkv, ", dim, ") = (", B, ", ", Lnew, ", ", Hkv,
              ", ", dim, "), got ", t.sizes());
}

// How decode_fwd cuts the work into tasks of (sequence, group of kv heads, key-range split).
// A task that owns all kv heads of a sequence reads every cache page (where a key's heads sit
// side by side) in one pass while it is fresh; on a contiguous cache that measured 2x the
// bandwidth of one task per kv head, whose rows are Hkv*D elements apart. So:
//   1. split the keys (num_splits = 0: as long as B sequences give the threads fewer than
//      TASKS_PER_THREAD tasks each and every split keeps MIN_KEYS_PER_SPLIT keys);
//   2. only if that is still too few tasks, divide the kv heads into groups.
struct WorkSplit {
  int64_t splits, kv_heads_per_task;
};

WorkSplit decode_work_split(int64_t B, int64_t Hkv, int64_t max_keys, int64_t threads, int64_t num_splits) {
  const int64_t target = TASKS_PER_THREAD * std::max<int64_t>(threads, 1);
  int64_t S = num_splits;
  if (S == 0) {
    const int64_t affordable = std::max<int64_t>(1, max_keys / MIN_KEYS_PER_SPLIT);
    S = std::clamp<int64_t>((target + B - 1) / B, 1, std::min(affordable, MAX_SPLITS));
  }
  int64_t G = Hkv;
  while (G > 1 && B * S * (Hkv / G) < target) {
    do --G; while (Hkv % G != 0);  // next smaller divisor of Hkv
  }
  return {S, G};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                  const std::optional<at::Tensor>& k_new,
                                                  const std::optional<at::Tensor>& v_new,
                                                  const std::optional<at::Tensor>& block_table,
                                                  const std::optional<at::Tensor>& cache_batch_idx, double scale,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  int64_t num_splits) {
  // ---- shapes, dtypes, devices
  TORCH_CHECK(q.dim() == 4, "fusedattn (cpu): q must be 4-D (B, Lq, Hq, D), got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "fusedattn (cpu): k_cache must be 4-D (B_cache, L_max, Hkv, D) or paged "
              "(num_blocks, PAGE_SIZE, Hkv, D), got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.dim() == 4, "fusedattn (cpu): v_cache must be 4-D like k_cache, got shape ", v_cache.sizes());
  check_cpu(q, "q");
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  const InDtype dtype = in_dtype(q, "q");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "fusedattn (cpu): k_cache and v_cache must have q's dtype ", q.scalar_type(), ", got ",
              k_cache.scalar_type(), " and ", v_cache.scalar_type());
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), Dv = v_cache.size(3);
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) && v_cache.size(2) == Hkv,
              "fusedattn (cpu): v_cache must match k_cache in all but the head dim, got k_cache ", k_cache.sizes(),
              ", v_cache ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(3) == D, "fusedattn (cpu): k_cache head dim ", k_cache.size(3), " != q head dim ", D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fusedattn (cpu): the number of query heads in q (", Hq,
              ") must be a multiple of the number of kv heads in k_cache (", Hkv, ")");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "fusedattn (cpu): k_cache and v_cache must have a contiguous last (head) dimension, got strides ",
              k_cache.strides(), " and ", v_cache.strides());
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fusedattn (cpu): window sizes must be >= 0 or -1 "
              "(unbounded), got (", window_left, ", ", window_right, ")");
  TORCH_CHECK(std::isfinite(scale), "fusedattn (cpu): scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "fusedattn (cpu): softcap must be >= 0, got ", softcap);
  TORCH_CHECK(num_splits >= 0 && num_splits <= MAX_SPLITS, "fusedattn (cpu): num_splits must be in [0, ",
              MAX_SPLITS, "] (0 = heuristic), got ", num_splits);

  check_int32_vector(cache_seqlens, "cache_seqlens", B);
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "fusedattn (cpu): k_new and v_new must be given together");
  if (k_new.has_value())
    TORCH_CHECK(k_new->dim() == 4, "fusedattn (cpu): k_new must be 4-D (B, Lnew, Hkv, D), got shape ",
                k_new->sizes());
  const int64_t Lnew = k_new.has_value() ? k_new->size(1) : 0;
  if (k_new.has_value()) {
    check_new_rows(*k_new, "k_new", q, B, Lnew, Hkv, D);
    check_new_rows(*v_new, "v_new", q, B, Lnew, Hkv, Dv);
  }
  const bool paged = block_table.has_value();
  at::Tensor bt;
  int64_t capacity = k_cache.size(1), page_size = 0, max_blocks = 0;
  if (paged) {
    check_cpu(*block_table, "block_table");
    TORCH_CHECK(block_table->scalar_type() == at::kInt, "fusedattn (cpu): block_table must be int32, got ",
                block_table->scalar_type());
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == B, "fusedattn (cpu): block_table must have "
                "shape (B, max_blocks) with B = ", B, ", got ", block_table->sizes());
    TORCH_CHECK(!cache_batch_idx.has_value(), "fusedattn (cpu): cache_batch_idx cannot be combined with "
                "block_table (a paged cache addresses sequences through the block table)");
    page_size = k_cache.size(1);
    max_blocks = block_table->size(1);
    TORCH_CHECK(page_size > 0, "fusedattn (cpu): a paged k_cache must have PAGE_SIZE > 0, got ", k_cache.sizes());
    capacity = max_blocks * page_size;
    bt = block_table->contiguous();
  }
  at::Tensor cbi;
  if (cache_batch_idx.has_value()) {
    check_int32_vector(*cache_batch_idx, "cache_batch_idx", B);
    cbi = cache_batch_idx->contiguous();
    const int32_t* idx = cbi.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(idx[b] >= 0 && idx[b] < k_cache.size(0), "fusedattn (cpu): cache_batch_idx[", b, "] = ", idx[b],
                  " is out of range for a cache of ", k_cache.size(0), " sequences");
  } else if (!paged) {
    TORCH_CHECK(k_cache.size(0) >= B, "fusedattn (cpu): k_cache holds ", k_cache.size(0),
                " sequences but q has batch ", B, " (pass cache_batch_idx to pick cache rows)");
  }

  // ---- values: every position and page the kernel will touch exists
  const at::Tensor seqlens = cache_seqlens.contiguous();
  const int32_t* sl = seqlens.data_ptr<int32_t>();
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sl[b] >= 0, "fusedattn (cpu): cache_seqlens[", b, "] = ", sl[b], " is negative");
    const int64_t Lk = sl[b] + Lnew;
    TORCH_CHECK(Lk <= capacity, "fusedattn (cpu): cache_seqlens[", b, "] + Lnew = ", sl[b], " + ", Lnew, " = ", Lk,
                " exceeds the cache capacity ", capacity,
                paged ? " (max_blocks * PAGE_SIZE of block_table and k_cache)" : " (L_max of k_cache)");
    if (paged) {
      const int32_t* row = bt.data_ptr<int32_t>() + b * max_blocks;
      for (int64_t blk = 0; blk < (Lk + page_size - 1) / page_size; ++blk)
        TORCH_CHECK(row[blk] >= 0 && row[blk] < k_cache.size(0), "fusedattn (cpu): block_table[", b, ", ", blk,
                    "] = ", row[blk], " is out of range for a cache of ", k_cache.size(0), " blocks");
    }
    max_keys = std::max(max_keys, Lk);
  }
  if (window_left >= 0) max_keys = std::min(max_keys, window_left + Lq + std::max<int64_t>(window_right, 0));

  at::Tensor out = at::empty({B, Lq, Hq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};

  DecodeParams p{};
  p.dtype = dtype;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.D = D; p.Dv = Dv;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  for (int d = 0; d < 4; ++d) {
    p.q_stride[d] = q.stride(d);
    p.k_stride[d] = k_cache.stride(d);
    p.v_stride[d] = v_cache.stride(d);
  }
  p.cache_seqlens = sl;
  p.cache_batch_idx = cbi.defined() ? cbi.data_ptr<int32_t>() : nullptr;
  p.block_table = paged ? bt.data_ptr<int32_t>() : nullptr;
  p.max_blocks = max_blocks;
  p.page_size = page_size;
  if (k_new.has_value()) {
    p.k_new = k_new->data_ptr();
    p.v_new = v_new->data_ptr();
    for (int d = 0; d < 4; ++d) {
      p.kn_stride[d] = k_new->stride(d);
      p.vn_stride[d] = v_new->stride(d);
    }
  }
  p.Lnew = Lnew;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = window_left;
  p.window_right = window_right;
  const WorkSplit work = decode_work_split(B, Hkv, max_keys, at::get_num_threads(), num_splits);
  p.num_splits = work.splits;
  p.kv_heads_per_task = work.kv_heads_per_task;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  decode_fwd_dispatch(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                              const at::Tensor& out_b, const at::Tensor& lse_b) {
  for (const auto& [t, name] : {std::pair{&out_a, "out_a"}, {&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}})
    check_cpu(*t, name);
  TORCH_CHECK(out_a.dim() == 4, "fusedattn (cpu): out_a must be 4-D (B, L, H, D), got shape ", out_a.sizes());
  TORCH_CHECK(out_b.sizes() == out_a.sizes() && out_b.scalar_type() == out_a.scalar_type(),
              "fusedattn (cpu): out_b must match out_a's shape and dtype, got ", out_b.scalar_type(), " ",
              out_b.sizes(), " vs ", out_a.scalar_type(), " ", out_a.sizes());
  const InDtype dtype = in_dtype(out_a, "out_a");
  const int64_t B = out_a.size(0), L = out_a.size(1), H = out_a.size(2), D = out_a.size(3);
  const std::vector<int64_t> lse_shape{B, H, L};
  for (const auto& [t, name] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == lse_shape, "fusedattn (cpu): ", name,
                " must be a float32 tensor of shape (B, H, L) = ", lse_shape, ", got ", t->scalar_type(), " ",
                t->sizes());
  at::Tensor out = at::empty({B, L, H, D}, out_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, H, L}, lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  // The kernel reads whole rows along D.
  const at::Tensor a = out_a.stride(3) == 1 ? out_a : out_a.contiguous();
  const at::Tensor b = out_b.stride(3) == 1 ? out_b : out_b.contiguous();
  MergeParams p{};
  p.dtype = dtype;
  p.B = B; p.L = L; p.H = H; p.D = D;
  p.out_a = a.data_ptr();
  p.out_b = b.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  for (int d = 0; d < 3; ++d) {
    p.oa_stride[d] = a.stride(d);
    p.ob_stride[d] = b.stride(d);
    p.la_stride[d] = lse_a.stride(d);
    p.lb_stride[d] = lse_b.stride(d);
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  merge_attention_states_dispatch(p);
  return {out, lse};
}

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("decode_fwd", &decode_fwd_cpu);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace fusedattn::cpu
