// Parameters of the CUDA kernels (csrc/cuda/*.cu): plain pointers, sizes and element strides, as in
// csrc/cpu/attention.h. Nothing here includes torch, so every kernel file compiles with a bare nvcc
// (tests/test_cuda_compile.py does exactly that on machines without a GPU). bindings.cu validates
// the tensors, fills these structs and launches through the functions declared at the bottom.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "decode_params.h"

namespace fusedattn::cuda {

enum class InDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Key j is visible to query i iff  i + diag_offset - window_left <= j <= i + diag_offset + window_right
// (-1 = unbounded side; causal is window_right = 0; diag_offset = Lk - Lq for bottom-right alignment, 0 for
// top-left). bindings.cu maps a window wider than Lq + Lk to -1, so this arithmetic never overflows int64.
struct AttnFwdParams {
  int64_t B, Hq, Hkv, Lq, Lk, D;                // D: head dim of q, k and v (the kernels need Dv == D)
  const void* q; int64_t q_stride[4];           // q: (B, Hq, Lq, D), q_stride[3] == 1, rows 16-byte aligned
  const void* k; int64_t k_stride[4];           // k: (B, Hkv, Lk, D), same
  const void* v; int64_t v_stride[4];           // v: (B, Hkv, Lk, D), same
  void* out;                                    // out: (B, Hq, Lq, D) contiguous, dtype of q
  float* lse;                                   // lse: (B, Hq, Lq) contiguous, natural log, -inf: no key seen
  float scale;
  int64_t window_left, window_right, diag_offset;
};

struct AttnBwdParams {
  int64_t B, Hq, Hkv, Lq, Lk, D;
  const void* q; int64_t q_stride[4];           // as in AttnFwdParams
  const void* k; int64_t k_stride[4];
  const void* v; int64_t v_stride[4];
  const void* dout; int64_t dout_stride[4];     // dout: (B, Hq, Lq, D), dtype of q, dout_stride[3] == 1
  const float* lse;                             // (B, Hq, Lq) contiguous, from the forward
  const float* delta;                           // (B, Hq, Lq) contiguous: rowsum(dout * out) - grad_lse
  void* dq;                                     // (B, Hq, Lq, D) contiguous, dtype of q
  void* dk;                                     // (B, Hkv, Lk, D) contiguous, dtype of q (summed over each GQA group)
  void* dv;                                     // (B, Hkv, Lk, D) contiguous
  float scale;
  int64_t window_left, window_right, diag_offset;
};

// KV-cache decoding (fusedattn::decode_fwd): the fields both devices share (csrc/decode_params.h, with the
// semantics; here Dv == D and 16-byte aligned cache rows), plus the CUDA kernels' split scratch. k_new / v_new are
// appended first, by decode_append_launch. The GPU kernels do not trust the index tensors (reading them on the host
// would cost a device sync): a sequence length is clamped to the cache capacity, and a page or cache row out of
// range (cache_rows) reads as zeros.
struct DecodeParams : DecodeCommon {
  float* out_partial;                           // (num_splits, B, Lq, Hq, D) fp32 scratch
  float* lse_partial;                           // (num_splits, B, Hq, Lq) fp32 scratch, natural log
};

// merge_attention_states: the fields both devices share (csrc/decode_params.h, with the formula); the CUDA kernel
// needs no other (the launcher is templated on the dtype).
using MergeParams = MergeCommon;

// Launchers: T is __half or __nv_bfloat16 (merge also float), D the head dim (64, 128 or 256). Each
// returns cudaGetLastError() after its launches. Instantiated in flash_fwd_hdim*.cu, flash_bwd_hdim*.cu,
// decode_hdim*.cu and merge.cu, one head dim per file so that the build parallelizes.
template <typename T, int D> cudaError_t attention_fwd_launch(const AttnFwdParams& p, cudaStream_t stream);
template <typename T, int D> cudaError_t attention_bwd_launch(const AttnBwdParams& p, cudaStream_t stream);
// Writes k_new / v_new into the caches (in place) at positions cache_seqlens[b] .. + Lnew - 1.
template <typename T, int D> cudaError_t decode_append_launch(const DecodeParams& p, cudaStream_t stream);
// Split-KV decode into out_partial / lse_partial, then the log-sum-exp combine into out / lse.
template <typename T, int D> cudaError_t decode_fwd_launch(const DecodeParams& p, cudaStream_t stream);
template <typename T> cudaError_t merge_attention_states_launch(const MergeParams& p, cudaStream_t stream);

// Rows of q (Lq * Hq / Hkv per kv head) one decode CTA handles; more rows use more CTAs.
constexpr int DECODE_ROWS_PER_CTA = 32;

}  // namespace fusedattn::cuda
