// Parameters shared by the CPU decode front-end (decode.cpp) and the per-ISA kernels
// (decode_kernel.cpp, compiled once per instruction set, picked in dispatch.cpp). As in
// attention.h: plain pointers, sizes and element strides, validated once in decode.cpp.
#pragma once

#include <cstdint>

#include "cpu/attention.h"  // InDtype
#include "decode_params.h"

namespace fusedattn::cpu {

// KV-cache decoding (fusedattn::decode_fwd): the fields both devices share (csrc/decode_params.h, with the
// semantics), plus the CPU's.
struct DecodeParams : DecodeCommon {
  InDtype dtype;                             // of q, the caches, k_new / v_new and out
  int64_t kv_heads_per_task;                 // divides Hkv: kv heads one task processes together
};

// Log-sum-exp merge of two attention states over disjoint key sets (merge_attention_states):
//   out = (e^(lse_a - M) out_a + e^(lse_b - M) out_b) / (e^(lse_a - M) + e^(lse_b - M)),
//   lse = M + log(e^(lse_a - M) + e^(lse_b - M)),  M = max(lse_a, lse_b).
struct MergeParams {
  InDtype dtype;                             // of out_a, out_b and out
  int64_t B, L, H, D;
  const void* out_a; int64_t oa_stride[3];   // (B, L, H, D), unit stride along D
  const void* out_b; int64_t ob_stride[3];
  const float* lse_a; int64_t la_stride[3];  // (B, H, L)
  const float* lse_b; int64_t lb_stride[3];
  void* out;                                 // (B, L, H, D) contiguous
  float* lse;                                // (B, H, L) contiguous
};

// Implemented once per ISA in namespace fusedattn::cpu::<ISA>.
#define FUSEDATTN_DECLARE_ISA(ISA)                         \
  namespace ISA {                                          \
  void decode_fwd_kernel(const DecodeParams& p);           \
  void merge_attention_states_kernel(const MergeParams& p); \
  }
FUSEDATTN_DECLARE_ISA(DEFAULT)
FUSEDATTN_DECLARE_ISA(AVX2)
FUSEDATTN_DECLARE_ISA(AVX512)
#undef FUSEDATTN_DECLARE_ISA

// Run-time choice (dispatch.cpp).
void decode_fwd_dispatch(const DecodeParams& p);
void merge_attention_states_dispatch(const MergeParams& p);

}  // namespace fusedattn::cpu
