// Argument checks of the fusedattn ops, written once for the CPU bindings (csrc/cpu/attention.cpp, varlen.cpp,
// decode.cpp) and the CUDA bindings (csrc/cuda/bindings.cpp). Each binding passes its DeviceRules (where the
// tensors must live, which dtypes its kernels take) and adds only the rules of its own kernels after these: the
// CPU reads the index values (cache_seqlens, block_table, cache_batch_idx, cu_seqlens), the CUDA bindings add
// alignment, grid and head-dim limits. Messages read "fusedattn (<device>): <argument> must ...".
//
// The Python wrappers (fusedattn/checks.py) validate first with ValueErrors; these TORCH_CHECKs make direct
// torch.ops.fusedattn calls (and compiled graphs, where the wrappers skip the value checks) just as safe.
// Torch-side only: the kernels never see an at::Tensor (csrc/params_fill.h fills their parameter structs).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "op_limits.h"

namespace fusedattn {

// TORCH_CHECK with the "fusedattn (<device>): " prefix of every message.
#define FUSEDATTN_CHECK(rules, cond, ...) TORCH_CHECK(cond, "fusedattn (", (rules).tag, "): ", __VA_ARGS__)

// What a device adds to the shared checks.
struct DeviceRules {
  explicit DeviceRules(const char* tag) : tag(tag) {}
  virtual ~DeviceRules() = default;
  const char* tag;  // "cpu" or "cuda", named in every message
  // Every tensor argument passes here before any of its pointers is read: where it lives (on_device), that it
  // is strided, and that its view lies inside its storage (check_storage).
  void device(const at::Tensor& t, const char* name) const;
  // Raises unless tensor argument `name` lives where this device's kernels run.
  virtual void on_device(const at::Tensor& t, const char* name) const = 0;
  // Raises unless q (or the first tensor argument) has a dtype the kernels take; the default takes any and
  // leaves the case to the kernel dispatch, which names the op.
  virtual void dtype(const at::Tensor& /*t*/, const char* /*name*/) const {}
};

// The bytes of storage t's view reaches (storage offset and strides included) must exist: a freed storage
// (t.untyped_storage().resize_(0)) or one shrunk under the view would have the kernels read or write memory the
// tensor does not own. The rule of torch's own set_/as_strided (computeStorageNbytes, checkInBoundsForStorage).
inline void check_storage(const DeviceRules& r, const at::Tensor& t, const char* name) {
  const size_t need = at::detail::computeStorageNbytes(t.sizes(), t.strides(), t.itemsize(), t.storage_offset());
  const size_t have = t.storage().nbytes();
  FUSEDATTN_CHECK(r, need <= have, name, " of sizes ", t.sizes(), ", strides ", t.strides(), " and storage offset ",
                  t.storage_offset(), " needs a storage of ", need, " bytes, but its storage holds ", have,
                  " bytes (was it freed or resized, e.g. by untyped_storage().resize_(0)?)");
}

inline void DeviceRules::device(const at::Tensor& t, const char* name) const {
  on_device(t, name);
  FUSEDATTN_CHECK(*this, t.layout() == at::kStrided, name, " must be a strided (dense) tensor, got layout ",
                  t.layout());
  check_storage(*this, t, name);
}

inline void check_float_dtype(const DeviceRules& r, const at::Tensor& t, const char* name) {
  const at::ScalarType st = t.scalar_type();
  FUSEDATTN_CHECK(r, st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
                  " must be float32, bfloat16 or float16, got ", st);
}

// An int32 vector of shape (n,) (cache_seqlens, cache_batch_idx).
inline void check_int32_vector(const DeviceRules& r, const at::Tensor& t, const char* name, int64_t n) {
  r.device(t, name);
  FUSEDATTN_CHECK(r, t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  FUSEDATTN_CHECK(r, t.dim() == 1 && t.size(0) == n, name, " must have shape (B,) = (", n, ",), got ", t.sizes());
}

inline void check_scalars(const DeviceRules& r, int64_t window_left, int64_t window_right, double scale,
                          double softcap) {
  FUSEDATTN_CHECK(r, window_left >= -1 && window_right >= -1,
                  "window sizes must be >= 0 or -1 (unbounded), got (", window_left, ", ", window_right, ")");
  FUSEDATTN_CHECK(r, std::isfinite(scale), "scale must be finite, got ", scale);
  FUSEDATTN_CHECK(r, std::isfinite(softcap) && softcap >= 0, "softcap must be >= 0, got ", softcap);
}

// A window side wider than any distance between a query and a key (span) hides nothing: it is -1
// (unbounded), which keeps the kernels' band arithmetic (i + off + right + 1) from wrapping around int64
// for windows near INT64_MAX.
inline int64_t normalize_window(int64_t w, int64_t span) { return w > span ? -1 : w; }

// ---------------------------------------------------------------------------------------------------------
// attention_fwd / attention_bwd (dense) and varlen_fwd / varlen_bwd (packed)
// ---------------------------------------------------------------------------------------------------------
enum class QkvLayout {
  kDense,   // q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)
  kPacked,  // q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv)
};

inline void check_qkv(const DeviceRules& r, QkvLayout layout, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v) {
  const bool dense = layout == QkvLayout::kDense;
  // axes of the key positions and the head dim; the head axis is 1 in both layouts
  const int64_t dims = dense ? 4 : 3, keys = dense ? 2 : 0, dim = dims - 1;
  FUSEDATTN_CHECK(r, q.dim() == dims, "q must be ", dims, "-D ", dense ? "(B, Hq, Lq, D)" : "(total_q, Hq, D)",
                  ", got shape ", q.sizes());
  FUSEDATTN_CHECK(r, k.dim() == dims, "k must be ", dims, "-D ", dense ? "(B, Hkv, Lk, D)" : "(total_k, Hkv, D)",
                  ", got shape ", k.sizes());
  FUSEDATTN_CHECK(r, v.dim() == dims, "v must be ", dims, "-D ", dense ? "(B, Hkv, Lk, Dv)" : "(total_k, Hkv, Dv)",
                  ", got shape ", v.sizes());
  r.device(q, "q");
  r.device(k, "k");
  r.device(v, "v");
  r.dtype(q, "q");
  FUSEDATTN_CHECK(r, k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  if (dense)
    FUSEDATTN_CHECK(r, k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ: q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes());
  FUSEDATTN_CHECK(r, v.size(keys) == k.size(keys) && v.size(1) == k.size(1), "v must have k's ",
                  dense ? "length" : "tokens", " and heads: k ", k.sizes(), ", v ", v.sizes());
  FUSEDATTN_CHECK(r, k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "the number of query heads (",
                  q.size(1), ") must be a multiple of the number of kv heads in k and v (", k.size(1), ")");
  FUSEDATTN_CHECK(r, k.size(dim) == q.size(dim), "k head dim ", k.size(dim), " != q head dim ", q.size(dim));
}

// The backward's extra tensors: grad_out and out of the output's shape (grad_out also of q's dtype), lse and
// grad_lse of lse's shape (lse float32; grad_lse any float dtype).
inline void check_backward(const DeviceRules& r, const at::Tensor& q, const at::Tensor& grad_out,
                           const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
                           at::IntArrayRef out_shape, at::IntArrayRef lse_shape) {
  r.device(grad_out, "grad_out");
  r.device(out, "out");
  r.device(lse, "lse");
  if (grad_lse.has_value()) r.device(*grad_lse, "grad_lse");
  FUSEDATTN_CHECK(r, grad_out.sizes() == out_shape && grad_out.scalar_type() == q.scalar_type(),
                  "grad_out must be a ", q.scalar_type(), " tensor of shape ", out_shape, ", got ",
                  grad_out.scalar_type(), " ", grad_out.sizes());
  FUSEDATTN_CHECK(r, out.sizes() == out_shape, "out must have shape ", out_shape, ", got ", out.sizes());
  FUSEDATTN_CHECK(r, lse.sizes() == lse_shape && lse.scalar_type() == at::kFloat,
                  "lse must be a float32 tensor of shape ", lse_shape, ", got ", lse.scalar_type(), " ", lse.sizes());
  if (grad_lse.has_value())
    FUSEDATTN_CHECK(r, grad_lse->sizes() == lse_shape, "grad_lse must have shape ", lse_shape, ", got ",
                    grad_lse->sizes());
}

// ---------------------------------------------------------------------------------------------------------
// decode_fwd
// ---------------------------------------------------------------------------------------------------------
struct DecodeShape {
  int64_t B, Lq, Hq, D, Hkv, Dv, Lnew;
  bool paged;
  int64_t capacity;               // positions per sequence: L_max, or max_blocks * PAGE_SIZE
  int64_t page_size, max_blocks;  // paged only (else 0)
  int64_t window_left, window_right;  // normalize_window'd over capacity + Lq
};

// Cache positions and query rows are bounded by 2^60 (expanded, stride-0 tensors could claim more), so that
// sums of a few of them, as in a window's band (window_left + Lq + window_right), never wrap around int64.
constexpr int64_t kMaxPositions = int64_t(1) << 60;

// decode_fwd's arguments, in the schema's order (csrc/torch_bindings.cpp).
struct DecodeInputs {
  const at::Tensor& q;
  const at::Tensor& k_cache;
  const at::Tensor& v_cache;
  const at::Tensor& cache_seqlens;
  const std::optional<at::Tensor>& k_new;
  const std::optional<at::Tensor>& v_new;
  const std::optional<at::Tensor>& block_table;
  const std::optional<at::Tensor>& cache_batch_idx;
  double scale;
  int64_t window_left, window_right;
  double softcap;
  int64_t num_splits;
};

// The decode_fwd kernel of a device, with the schema's signature written once: each binding registers
// decode_fwd_op<&its_impl>, where its_impl(const DecodeInputs&) starts with check_decode.
template <std::tuple<at::Tensor, at::Tensor> (*Impl)(const DecodeInputs&)>
std::tuple<at::Tensor, at::Tensor> decode_fwd_op(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                 const std::optional<at::Tensor>& k_new,
                                                 const std::optional<at::Tensor>& v_new,
                                                 const std::optional<at::Tensor>& block_table,
                                                 const std::optional<at::Tensor>& cache_batch_idx, double scale,
                                                 int64_t window_left, int64_t window_right, double softcap,
                                                 int64_t num_splits) {
  return Impl(DecodeInputs{q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx, scale,
                           window_left, window_right, softcap, num_splits});
}

// The first and one-past-the-last byte a (non-empty) view can touch.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.itemsize())};
}

// The append writes k_cache and v_cache in place, reading k_new and v_new. As torch's own in-place writes (copy_,
// index_put_), it refuses what would make the result depend on the order of the writes: a cache with internal
// overlap (expand()ed over kv heads or sequences: two positions, one memory location), caches that share memory
// (k_cache is v_cache, or overlapping views) -- ATen's has_internal_overlap / get_overlap_status, the tests of
// assert_no_internal_overlap and assert_no_overlap -- and an input that is a view into a cache. For the last,
// torch's test passes views it finds too hard to compare (a slice of a batched cache), so any k_new / v_new whose
// bytes fall within a cache's is refused (clone() it first).
inline void check_append_aliasing(const DeviceRules& r, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& k_new, const at::Tensor& v_new) {
  constexpr const char* kClone = ". Please clone() the tensor before performing the operation.";
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    FUSEDATTN_CHECK(r, at::has_internal_overlap(*t) != at::MemOverlap::Yes, "unsupported operation: more than one "
                    "element of the written-to tensor ", name, " refers to a single memory location (an expand()ed "
                    "cache?)", kClone);
  const at::MemOverlapStatus kv = at::get_overlap_status(k_cache, v_cache);
  FUSEDATTN_CHECK(r, kv != at::MemOverlapStatus::Full && kv != at::MemOverlapStatus::Partial, "unsupported "
                  "operation: k_cache and v_cache, both written to, refer to the same memory locations", kClone);
  for (const auto& [in, in_name] : {std::pair{&k_new, "k_new"}, {&v_new, "v_new"}}) {
    if (in->numel() == 0) continue;
    const auto [in_lo, in_hi] = byte_span(*in);
    for (const auto& [c, c_name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
      const at::MemOverlapStatus st = at::get_overlap_status(*c, *in);
      bool overlaps = st == at::MemOverlapStatus::Full || st == at::MemOverlapStatus::Partial;
      if (!overlaps && c->numel() > 0 && c->storage().is_alias_of(in->storage())) {
        const auto [c_lo, c_hi] = byte_span(*c);
        overlaps = in_lo < c_hi && c_lo < in_hi;
      }
      FUSEDATTN_CHECK(r, !overlaps, "unsupported operation: some elements of the input tensor ", in_name,
                      " and the written-to tensor ", c_name, " refer to a single memory location", kClone);
    }
  }
}

// Shapes, dtypes, devices, storage, aliasing and scalars of decode_fwd (see its schema in
// csrc/torch_bindings.cpp). The index values are not read here: the CPU binding reads them, the CUDA kernels
// clamp them (no device sync).
inline DecodeShape check_decode(const DeviceRules& r, const DecodeInputs& in) {
  const auto& [q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx, scale, window_left,
               window_right, softcap, num_splits] = in;
  FUSEDATTN_CHECK(r, q.dim() == 4, "q must be 4-D (B, Lq, Hq, D), got shape ", q.sizes());
  FUSEDATTN_CHECK(r, k_cache.dim() == 4, "k_cache must be 4-D (B_cache, L_max, Hkv, D) or paged "
                  "(num_blocks, PAGE_SIZE, Hkv, D), got shape ", k_cache.sizes());
  FUSEDATTN_CHECK(r, v_cache.dim() == 4, "v_cache must be 4-D like k_cache, got shape ", v_cache.sizes());
  r.device(q, "q");
  r.device(k_cache, "k_cache");
  r.device(v_cache, "v_cache");
  r.dtype(q, "q");
  FUSEDATTN_CHECK(r, k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                  "k_cache and v_cache must have q's dtype ", q.scalar_type(), ", got ", k_cache.scalar_type(),
                  " and ", v_cache.scalar_type());
  DecodeShape s{};
  s.B = q.size(0), s.Lq = q.size(1), s.Hq = q.size(2), s.D = q.size(3);
  s.Hkv = k_cache.size(2), s.Dv = v_cache.size(3);
  FUSEDATTN_CHECK(r, v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) &&
                  v_cache.size(2) == s.Hkv, "v_cache must match k_cache in all but the head dim, got k_cache ",
                  k_cache.sizes(), ", v_cache ", v_cache.sizes());
  FUSEDATTN_CHECK(r, k_cache.size(3) == s.D, "k_cache head dim ", k_cache.size(3), " != q head dim ", s.D);
  FUSEDATTN_CHECK(r, s.Hkv > 0 && s.Hq % s.Hkv == 0, "the number of query heads in q (", s.Hq,
                  ") must be a multiple of the number of kv heads in k_cache (", s.Hkv, ")");
  FUSEDATTN_CHECK(r, k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
                  "k_cache and v_cache must have a contiguous last (head) dimension, got strides ",
                  k_cache.strides(), " and ", v_cache.strides());
  check_scalars(r, window_left, window_right, scale, softcap);
  FUSEDATTN_CHECK(r, num_splits >= 0 && num_splits <= MAX_SPLITS, "num_splits must be in [0, ", MAX_SPLITS,
                  "] (0 = heuristic), got ", num_splits);

  check_int32_vector(r, cache_seqlens, "cache_seqlens", s.B);
  FUSEDATTN_CHECK(r, k_new.has_value() == v_new.has_value(), "k_new and v_new must be given together");
  if (k_new.has_value()) {
    FUSEDATTN_CHECK(r, k_new->dim() == 4, "k_new must be 4-D (B, Lnew, Hkv, D), got shape ", k_new->sizes());
    s.Lnew = k_new->size(1);
    for (const auto& [t, name, dim] : {std::tuple{&*k_new, "k_new", s.D}, {&*v_new, "v_new", s.Dv}}) {
      r.device(*t, name);
      FUSEDATTN_CHECK(r, t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
                      ", got ", t->scalar_type());
      FUSEDATTN_CHECK(r, t->dim() == 4 && t->size(0) == s.B && t->size(1) == s.Lnew && t->size(2) == s.Hkv &&
                      t->size(3) == dim, name, " must have shape (B, Lnew, Hkv, ", dim, ") = (", s.B, ", ", s.Lnew,
                      ", ", s.Hkv, ", ", dim, "), got ", t->sizes());
    }
    check_append_aliasing(r, k_cache, v_cache, *k_new, *v_new);
    for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
      FUSEDATTN_CHECK(r, !t->is_inference() || c10::InferenceMode::is_enabled(), name, ": Inplace update to "
                      "inference tensor outside InferenceMode is not allowed. You can make a clone to get a normal "
                      "tensor before doing inplace update. See https://github.com/pytorch/rfcs/pull/17 for more "
                      "details.");
  }
  s.paged = block_table.has_value();
  s.capacity = k_cache.size(1);
  if (s.paged) {
    r.device(*block_table, "block_table");
    FUSEDATTN_CHECK(r, block_table->scalar_type() == at::kInt, "block_table must be int32, got ",
                    block_table->scalar_type());
    FUSEDATTN_CHECK(r, block_table->dim() == 2 && block_table->size(0) == s.B, "block_table must have shape "
                    "(B, max_blocks) with B = ", s.B, ", got ", block_table->sizes());
    FUSEDATTN_CHECK(r, !cache_batch_idx.has_value(), "cache_batch_idx cannot be combined with block_table (a "
                    "paged cache addresses sequences through the block table)");
    s.page_size = k_cache.size(1);
    s.max_blocks = block_table->size(1);
    FUSEDATTN_CHECK(r, s.page_size > 0, "a paged k_cache must have PAGE_SIZE > 0, got ", k_cache.sizes());
    // max_blocks * PAGE_SIZE must not wrap: a (B, max_blocks) block table may be expanded (stride 0).
    FUSEDATTN_CHECK(r, s.max_blocks <= kMaxPositions / s.page_size, "block_table has too many blocks (",
                    s.max_blocks, ") for PAGE_SIZE ", s.page_size);
    s.capacity = s.max_blocks * s.page_size;
  } else if (cache_batch_idx.has_value()) {
    check_int32_vector(r, *cache_batch_idx, "cache_batch_idx", s.B);
  } else {
    FUSEDATTN_CHECK(r, k_cache.size(0) >= s.B, "k_cache holds ", k_cache.size(0), " sequences but q has batch ",
                    s.B, " (pass cache_batch_idx to pick cache rows)");
  }
  FUSEDATTN_CHECK(r, s.capacity <= kMaxPositions && s.Lq <= kMaxPositions, "the cache (", s.capacity,
                  " positions per sequence) or q (", s.Lq, " rows) is longer than 2^60");
  s.window_left = normalize_window(window_left, s.capacity + s.Lq);
  s.window_right = normalize_window(window_right, s.capacity + s.Lq);
  return s;
}

// The most keys a sequence's query rows see together, `longest` keys in the longest sequence: all of them, or
// the window's band (what the split heuristics divide).
inline int64_t decode_keys_read(const DecodeShape& s, int64_t longest) {
  return s.window_left >= 0 ? std::min(longest, s.window_left + s.Lq + std::max<int64_t>(s.window_right, 0))
                            : longest;
}

// The split count a kernel runs: num_splits (explicit, or a heuristic's) but no more than the keys read, so
// that no split is empty -- 1024 splits of 16 keys would allocate and merge 1024 partial states, 1008 of them
// empty. The kernels cut `keys` keys into chunks of ceil(keys / S): for every S >= keys that is one key per
// split, so the cap leaves the partition, and the result, unchanged.
inline int64_t cap_splits(int64_t splits, int64_t keys) {
  return std::clamp<int64_t>(splits, 1, std::max<int64_t>(keys, 1));
}

// ---------------------------------------------------------------------------------------------------------
// merge_attention_states
// ---------------------------------------------------------------------------------------------------------
inline void check_merge(const DeviceRules& r, const at::Tensor& out_a, const at::Tensor& lse_a,
                        const at::Tensor& out_b, const at::Tensor& lse_b) {
  r.device(out_a, "out_a");
  r.device(lse_a, "lse_a");
  r.device(out_b, "out_b");
  r.device(lse_b, "lse_b");
  FUSEDATTN_CHECK(r, out_a.dim() == 4, "out_a must be 4-D (B, L, H, D), got shape ", out_a.sizes());
  FUSEDATTN_CHECK(r, out_b.sizes() == out_a.sizes() && out_b.scalar_type() == out_a.scalar_type(),
                  "out_b must match out_a's shape and dtype, got ", out_b.scalar_type(), " ", out_b.sizes(), " vs ",
                  out_a.scalar_type(), " ", out_a.sizes());
  check_float_dtype(r, out_a, "out_a");
  const std::vector<int64_t> lse_shape{out_a.size(0), out_a.size(2), out_a.size(1)};
  for (const auto& [t, name] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}})
    FUSEDATTN_CHECK(r, t->scalar_type() == at::kFloat && t->sizes() == lse_shape, name,
                    " must be a float32 tensor of shape (B, H, L) = ", lse_shape, ", got ", t->scalar_type(), " ",
                    t->sizes());
}

}  // namespace fusedattn
