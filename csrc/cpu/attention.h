// Parameters shared by the CPU attention front-ends (attention.cpp, varlen.cpp) and the per-ISA kernels
// (attention_kernel.cpp, compiled once per instruction set, picked in dispatch.cpp).
// Plain structs of pointers, sizes and element strides: the kernels never see an at::Tensor,
// so validation and allocation live in the front-ends. Outputs take strides too, so that the varlen
// front-end can hand the kernel one sequence of a packed (total, H, D) output as a (1, H, L, D) view.
#pragma once

#include <cstdint>
#include <string>

namespace fusedattn::cpu {

enum class InDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Which keys a query row may see. Query i, key j, off = Lk - Lq (bottom-right) or 0 (top-left):
//   visible  <=>  i + off - window_left <= j <= i + off + window_right   (-1 = unbounded side)
// causal is window_right = 0. An additive float32 mask is added on top of this.
struct MaskSpec {
  int64_t window_left = -1;
  int64_t window_right = -1;
  int64_t diag_offset = 0;
  const float* mask = nullptr;  // additive, broadcast to (B, Hq, Lq, Lk) by strides; last stride 1
  int64_t mask_stride[3] = {0, 0, 0};  // b, h, i  (elements)
  // The mask came from a bool mask (entries 0 / -inf): a -inf entry hides its key outright
  // (score = -inf, not score + -inf), so a NaN score there stays hidden, as torch's masked_fill does.
  // An additive float mask is added as is (NaN + -inf is NaN, as in torch).
  bool mask_hides = false;
};

struct AttnFwdParams {
  InDtype dtype;
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  const void* q; int64_t q_stride[4];  // q: (B, Hq, Lq, D)
  const void* k; int64_t k_stride[4];  // k: (B, Hkv, Lk, D)
  const void* v; int64_t v_stride[4];  // v: (B, Hkv, Lk, Dv)
  void* out; int64_t out_stride[3];    // out: (B, Hq, Lq, Dv), dtype of q; strides b, h, i (last dim contiguous)
  float* lse; int64_t lse_stride[2];   // lse: (B, Hq, Lq), natural log; strides b, h (rows contiguous)
  float scale, softcap;
  MaskSpec mask;
};

struct AttnBwdParams {
  InDtype dtype;
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  const void* q; int64_t q_stride[4];
  const void* k; int64_t k_stride[4];
  const void* v; int64_t v_stride[4];
  const void* dout; int64_t dout_stride[4];  // dout: (B, Hq, Lq, Dv), dtype of q
  const float* lse;                          // (B, Hq, Lq)
  const float* delta;                        // (B, Hq, Lq): rowsum(dout * out) - grad_lse
  int64_t lse_stride[2];                     // b, h strides of lse and delta (rows contiguous)
  void* dq; int64_t dq_stride[3];            // (B, Hq, Lq, D), dtype of q; strides b, h, i (last dim contiguous)
  float* dk_per_qhead;                       // (B, Hq, Lk, D) contiguous fp32 (summed over GQA groups by caller)
  float* dv_per_qhead;                       // (B, Hq, Lk, Dv) contiguous fp32
  float scale, softcap;
  MaskSpec mask;
};

// Implemented once per ISA in namespace fusedattn::cpu::<ISA>.
#define FUSEDATTN_DECLARE_ISA(ISA)                          \
  namespace ISA {                                           \
  void attention_fwd_kernel(const AttnFwdParams& p);        \
  void attention_bwd_kernel(const AttnBwdParams& p);        \
  }
FUSEDATTN_DECLARE_ISA(DEFAULT)
FUSEDATTN_DECLARE_ISA(AVX2)
FUSEDATTN_DECLARE_ISA(AVX512)
FUSEDATTN_DECLARE_ISA(AVX512_BF16)  // the forward's bf16 case only (vdpbf16ps); everything else is AVX512's
#undef FUSEDATTN_DECLARE_ISA
namespace AVX512_BF16 {
// The bf16 forward on AMX tiles (D % 32 == 0, Dv % 16 == 0); built when the compiler has -mamx-bf16
// (FUSEDATTN_HAS_AMX), called only after the process has the kernel's permission to use AMX state.
void attention_fwd_amx_kernel(const AttnFwdParams& p);
}

// Run-time choice (dispatch.cpp).
void attention_fwd_dispatch(const AttnFwdParams& p);
void attention_bwd_dispatch(const AttnBwdParams& p);
// Name of the ISA the dispatcher uses on this machine ("AVX512", "AVX2" or "DEFAULT").
const char* selected_isa();
// What serves the bf16 attention forward here and why (AMX tiles, vdpbf16ps, or the selected ISA's
// widening kernel with the reason). Follows FUSEDATTN_CPU_BF16 as it is now.
std::string bf16_forward_path();

}  // namespace fusedattn::cpu
