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

// merge_attention_states: the shared fields (csrc/decode_params.h, with the formula), plus the CPU's.
struct MergeParams : MergeCommon {
  InDtype dtype;                             // of out_a, out_b and out
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
