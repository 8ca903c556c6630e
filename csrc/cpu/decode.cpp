// CPU implementations of fusedattn::decode_fwd and fusedattn::merge_attention_states: the split-count
// heuristic and output allocation; the arithmetic is in decode_kernel.cpp. The argument checks are
// csrc/checks.h's (shared with the CUDA bindings); this file adds the index values' (cache_seqlens,
// block_table, cache_batch_idx), so that no index the kernel follows can point outside its tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/attention_common.h"
#include "cpu/decode.h"
#include "params_fill.h"

namespace fusedattn::cpu {
namespace {

// The heuristic aims at this many tasks per thread, so that dynamic scheduling can even out
// sequences of different lengths.
constexpr int64_t TASKS_PER_THREAD = 2;
// Below this many keys per split, writing and merging the partial states costs more than the
// extra parallelism gains.
constexpr int64_t MIN_KEYS_PER_SPLIT = 512;

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
  S = cap_splits(S, max_keys);
  int64_t G = Hkv;
  while (G > 1 && B * S * (Hkv / G) < target) {
    do --G; while (Hkv % G != 0);  // next smaller divisor of Hkv
  }
  return {S, G};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_fwd_cpu(const DecodeInputs& in) {
  const DecodeShape s = check_decode(kCpu, in);
  const at::Tensor &q = in.q, &k_cache = in.k_cache;
  const std::optional<at::Tensor>&block_table = in.block_table, &cache_batch_idx = in.cache_batch_idx;
  const int64_t B = s.B, Lq = s.Lq, Hq = s.Hq, Hkv = s.Hkv, Dv = s.Dv;

  // ---- values: every position and page the kernel will touch exists
  const at::Tensor seqlens = in.cache_seqlens.contiguous();
  const at::Tensor bt = s.paged ? block_table->contiguous() : at::Tensor();
  const at::Tensor cbi = cache_batch_idx.has_value() ? cache_batch_idx->contiguous() : at::Tensor();
  if (cbi.defined()) {
    const int32_t* idx = cbi.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(idx[b] >= 0 && idx[b] < k_cache.size(0), "fusedattn (cpu): cache_batch_idx[", b, "] = ", idx[b],
                  " is out of range for a cache of ", k_cache.size(0), " sequences");
  }
  const int32_t* sl = seqlens.data_ptr<int32_t>();
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sl[b] >= 0, "fusedattn (cpu): cache_seqlens[", b, "] = ", sl[b], " is negative");
    const int64_t Lk = sl[b] + s.Lnew;
    TORCH_CHECK(Lk <= s.capacity, "fusedattn (cpu): cache_seqlens[", b, "] + Lnew = ", sl[b], " + ", s.Lnew, " = ",
                Lk, " exceeds the cache capacity ", s.capacity,
                s.paged ? " (max_blocks * PAGE_SIZE of block_table and k_cache)" : " (L_max of k_cache)");
    if (s.paged) {
      const int32_t* row = bt.data_ptr<int32_t>() + b * s.max_blocks;
      for (int64_t blk = 0; blk < (Lk + s.page_size - 1) / s.page_size; ++blk)
        TORCH_CHECK(row[blk] >= 0 && row[blk] < k_cache.size(0), "fusedattn (cpu): block_table[", b, ", ", blk,
                    "] = ", row[blk], " is out of range for a cache of ", k_cache.size(0), " blocks");
    }
    max_keys = std::max(max_keys, Lk);
  }
  max_keys = decode_keys_read(s, max_keys);

  at::Tensor out = at::empty({B, Lq, Hq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};

  DecodeParams p{};
  fill_decode(p, s, in, seqlens, bt, cbi);
  p.dtype = in_dtype(q);
  const WorkSplit work = decode_work_split(B, Hkv, max_keys, at::get_num_threads(), in.num_splits);
  p.num_splits = work.splits;
  p.kv_heads_per_task = work.kv_heads_per_task;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  decode_fwd_dispatch(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                              const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_merge(kCpu, out_a, lse_a, out_b, lse_b);
  const MergeTensors m = merge_tensors(out_a, lse_a, out_b);
  if (m.out.numel() == 0 && m.lse.numel() == 0) return {m.out, m.lse};
  MergeParams p{};
  fill_merge(p, m, lse_a, lse_b);
  p.dtype = in_dtype(out_a);
  merge_attention_states_dispatch(p);
  return {m.out, m.lse};
}

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("decode_fwd", &decode_fwd_op<&decode_fwd_cpu>);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace fusedattn::cpu
