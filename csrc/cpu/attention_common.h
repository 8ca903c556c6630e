// Front-end helpers shared by the CPU ops (attention.cpp: dense, varlen.cpp: packed variable-length,
// decode.cpp): the CPU's device rules for the shared checks (csrc/checks.h), the dtype mapping, the size
// bound of the CPU kernels' scratch, and filling the attention kernels' parameter structs from (B, H, L, D)
// tensor views of any strides. Torch-side only (the kernels never see an at::Tensor).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "checks.h"
#include "cpu/attention.h"
#include "params_fill.h"

namespace fusedattn::cpu {

// CPU tensors of float32, bfloat16 or float16.
struct CpuRules final : DeviceRules {
  CpuRules() : DeviceRules("cpu") {}
  void on_device(const at::Tensor& t, const char* name) const override {
    FUSEDATTN_CHECK(*this, t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  }
  void dtype(const at::Tensor& t, const char* name) const override { check_float_dtype(*this, t, name); }
};
inline const CpuRules kCpu;

// The kernels' dtype tag of a tensor that passed CpuRules::dtype.
inline InDtype in_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return InDtype::kBFloat16;
    case at::kHalf: return InDtype::kFloat16;
    default: return InDtype::kFloat32;
  }
}

// The kernels index with int64 and size their fp32 scratch by products of the dimensions (packed
// V is B*Hkv*Lk*Dv_pad floats, a head's Q rows Lq*D_pad, ...). Stride-0 expanded inputs can have
// dimensions no memory could hold, where such a product would wrap around int64 and a too-small
// buffer would then be written past its end: refuse them. B*Hq*(L+64)*(D+64) bounds every
// scratch buffer (tiles pad L and D by less than 64); below 2^60 elements nothing wraps and an
// allocation either succeeds or fails with an error.
inline void check_sizes(int64_t B, int64_t Hq, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv) {
  constexpr int64_t kLimit = int64_t(1) << 60;
  const int64_t L = std::max(Lq, Lk), E = std::max(D, Dv);
  int64_t n = 0;
  const bool too_big = L >= kLimit || E >= kLimit || c10::mul_overflows(B, Hq, &n) ||
                       c10::mul_overflows(n, L + 64, &n) || c10::mul_overflows(n, E + 64, &n) || n >= kLimit;
  TORCH_CHECK(!too_big, "fusedattn (cpu): inputs too large for the CPU kernel: B=", B,
              " Hq=", Hq, " Lq=", Lq, " Lk=", Lk, " D=", D, " Dv=", Dv,
              " would need more than 2^60 elements of scratch (expanded, stride-0 inputs?)");
}

template <typename P>
void fill_common(P& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                 int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                 const at::Tensor* mask) {
  fill_qkv(p, q, k, v);
  p.dtype = in_dtype(q);
  p.Dv = v.size(3);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  // Call after check_sizes (which bounds Lq + Lk).
  p.mask.window_left = normalize_window(window_left, p.Lq + p.Lk);
  p.mask.window_right = normalize_window(window_right, p.Lq + p.Lk);
  p.mask.diag_offset = bottom_right ? p.Lk - p.Lq : 0;
  if (mask) {
    p.mask.mask = mask->data_ptr<float>();
    copy_strides(p.mask.mask_stride, *mask);
  }
}

}  // namespace fusedattn::cpu
