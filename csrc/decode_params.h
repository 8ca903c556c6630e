// The parameters of decode_fwd and merge_attention_states that the CPU (csrc/cpu/decode.h) and CUDA
// (csrc/cuda/params.h) kernels share, written once: plain pointers, sizes and element strides, filled by
// fill_decode / fill_merge (csrc/params_fill.h) after the checks of csrc/checks.h. Each device's DecodeParams
// (MergeParams) derives from DecodeCommon (MergeCommon) and adds only its own fields.
// Torch-free and CUDA-free, so that the per-ISA CPU kernels and a bare nvcc compile it.
//
// Semantics (fusedattn::decode_fwd, csrc/torch_bindings.cpp): sequence b has Lk_b = cache_seqlens[b] + Lnew keys
// once k_new / v_new are appended at positions cache_seqlens[b] .. +Lnew-1. Query row i sits at position
// Lk_b - Lq + i (bottom-right aligned) and sees key j iff
//   Lk_b - Lq + i - window_left <= j <= Lk_b - Lq + i + window_right   (-1 = unbounded side).
// Key j of sequence b, kv head h lives at
//   contiguous: cache[cache_batch_idx ? cache_batch_idx[b] : b][j][h]
//   paged:      cache[block_table[b][j / page_size]][j % page_size][h]
#pragma once

#include <cstdint>

namespace fusedattn {

struct DecodeCommon {
  int64_t B, Hq, Hkv, Lq, D, Dv;
  const void* q; int64_t q_stride[4];        // q: (B, Lq, Hq, D)
  void* k_cache; int64_t k_stride[4];        // (B_cache, L_max, Hkv, D) or (num_blocks, PAGE_SIZE, Hkv, D); k_stride[3] == 1
  void* v_cache; int64_t v_stride[4];        // same, head dim Dv; v_stride[3] == 1
  int64_t cache_rows;                        // B_cache (contiguous) or num_blocks (paged): valid first indices
  int64_t capacity;                          // L_max (contiguous) or max_blocks * page_size (paged)
  const int32_t* cache_seqlens;              // (B,) contiguous: keys in the cache before the append
  const int32_t* cache_batch_idx;            // (B,) contiguous, or null (contiguous cache only)
  const int32_t* block_table;                // (B, max_blocks) contiguous, or null (contiguous cache)
  int64_t max_blocks, page_size;             // paged only
  const void* k_new; int64_t kn_stride[4];   // (B, Lnew, Hkv, D), or null (absent, or D == 0)
  const void* v_new; int64_t vn_stride[4];   // (B, Lnew, Hkv, Dv), or null (absent, or Dv == 0)
  int64_t Lnew;                              // 0 when k_new / v_new are absent
  float scale, softcap;
  int64_t window_left, window_right;         // normalized: no side wider than capacity + Lq (else -1)
  int64_t num_splits;                        // >= 1 key-range splits per sequence (at most the keys read, >= 1)
  void* out;                                 // (B, Lq, Hq, Dv) contiguous, dtype of q
  float* lse;                                // (B, Hq, Lq) contiguous, natural log
};

// Log-sum-exp merge of two attention states over disjoint key sets (merge_attention_states):
//   out = (e^(lse_a - M) out_a + e^(lse_b - M) out_b) / (e^(lse_a - M) + e^(lse_b - M)),
//   lse = M + log(e^(lse_a - M) + e^(lse_b - M)),  M = max(lse_a, lse_b).
struct MergeCommon {
  int64_t B, L, H, D;
  const void* out_a; int64_t oa_stride[3];   // (B, L, H, D), unit stride along D
  const void* out_b; int64_t ob_stride[3];
  const float* lse_a; int64_t la_stride[3];  // (B, H, L)
  const float* lse_b; int64_t lb_stride[3];
  void* out;                                 // (B, L, H, D) contiguous, dtype of out_a
  float* lse;                                // (B, H, L) contiguous
};

}  // namespace fusedattn
