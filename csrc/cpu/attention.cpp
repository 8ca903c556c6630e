// CPU implementations of fusedattn::attention_fwd / attention_bwd: argument checks, output
// allocation and the mask's memory layout; the arithmetic is in attention_kernel.cpp.
// The argument checks are csrc/checks.h's, shared with the CUDA bindings; this file adds the mask's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "cpu/attention.h"
#include "cpu/attention_common.h"

namespace fusedattn::cpu {
namespace {

// Brings attn_mask to an additive float32 tensor broadcast (stride 0) to (B, Hq, Lq, Lk) whose
// last dimension is contiguous, without materializing the broadcast dimensions.
at::Tensor prepare_mask(const at::Tensor& mask, int64_t B, int64_t Hq, int64_t Lq, int64_t Lk) {
  TORCH_CHECK(mask.device().is_cpu(), "fusedattn (cpu): attn_mask must be on the CPU, got ", mask.device());
  TORCH_CHECK(mask.dim() <= 4, "fusedattn (cpu): attn_mask must have at most 4 dims, got shape ", mask.sizes());
  const int64_t full[4] = {B, Hq, Lq, Lk};
  std::vector<int64_t> shape(4 - mask.dim(), 1);
  for (int64_t s : mask.sizes()) shape.push_back(s);
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(shape[d] == 1 || shape[d] == full[d], "fusedattn (cpu): attn_mask of shape ", mask.sizes(),
                " does not broadcast to (B, Hq, Lq, Lk) = (", B, ", ", Hq, ", ", Lq, ", ", Lk, ")");
  at::Tensor m = mask.reshape(shape);
  if (m.scalar_type() == at::kBool) {
    m = at::where(m, at::zeros({}, m.options().dtype(at::kFloat)),
                  at::full({}, -std::numeric_limits<float>::infinity(), m.options().dtype(at::kFloat)));
  } else {
    TORCH_CHECK(at::isFloatingType(m.scalar_type()), "fusedattn (cpu): attn_mask must be bool or floating, got ",
                m.scalar_type());
    m = m.to(at::kFloat);
  }
  if (m.size(3) != Lk) m = m.expand({m.size(0), m.size(1), m.size(2), Lk});
  if (m.stride(3) != 1) m = m.contiguous();
  return m.expand({B, Hq, Lq, Lk});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& attn_mask, double scale,
                                                     int64_t window_left, int64_t window_right, bool bottom_right,
                                                     double softcap) {
  check_qkv(kCpu, QkvLayout::kDense, q, k, v);
  check_scalars(kCpu, window_left, window_right, scale, softcap);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), Lk = k.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, Hq, Lq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  std::optional<at::Tensor> mask;  // checked (and converted) even when the output is empty
  if (attn_mask.has_value()) mask = prepare_mask(*attn_mask, B, Hq, Lq, Lk);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  check_sizes(B, Hq, Lq, Lk, q.size(3), Dv);
  AttnFwdParams p{};
  fill_common(p, q, k, v, scale, window_left, window_right, bottom_right, softcap, mask ? &*mask : nullptr);
  p.mask.mask_hides = attn_mask.has_value() && attn_mask->scalar_type() == at::kBool;
  p.out = out.data_ptr();
  copy_strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();
  copy_strides(p.lse_stride, lse);
  attention_fwd_dispatch(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, const std::optional<at::Tensor>& grad_lse) {
  check_qkv(kCpu, QkvLayout::kDense, q, k, v);
  check_scalars(kCpu, window_left, window_right, scale, softcap);
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3),
                Dv = v.size(3);
  const std::vector<int64_t> o_shape{B, Hq, Lq, Dv}, l_shape{B, Hq, Lq};
  check_backward(kCpu, q, grad_out, out, lse, grad_lse, o_shape, l_shape);

  std::optional<at::Tensor> mask;
  if (attn_mask.has_value()) mask = prepare_mask(*attn_mask, B, Hq, Lq, Lk);
  at::Tensor dq = at::empty({B, Hq, Lq, D}, q.options());
  if (q.numel() == 0 && k.numel() == 0 && v.numel() == 0)
    return {dq, at::empty_like(k, at::MemoryFormat::Contiguous), at::empty_like(v, at::MemoryFormat::Contiguous)};
  check_sizes(B, Hq, Lq, Lk, D, Dv);
  // delta_i = sum_d dout_id * out_id  (- dlse_i): the softmax Jacobian's row term.
  at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (grad_lse.has_value()) delta = delta - grad_lse->to(at::kFloat);
  delta = delta.contiguous();
  at::Tensor lse_c = lse.contiguous();
  at::Tensor dk_h = at::empty({B, Hq, Lk, D}, q.options().dtype(at::kFloat));
  at::Tensor dv_h = at::empty({B, Hq, Lk, Dv}, q.options().dtype(at::kFloat));

  AttnBwdParams p{};
  fill_common(p, q, k, v, scale, window_left, window_right, bottom_right, softcap, mask ? &*mask : nullptr);
  p.mask.mask_hides = attn_mask.has_value() && attn_mask->scalar_type() == at::kBool;
  p.dout = grad_out.data_ptr();
  copy_strides(p.dout_stride, grad_out);
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  copy_strides(p.lse_stride, lse_c);  // delta: same shape, also contiguous
  p.dq = dq.data_ptr();
  copy_strides(p.dq_stride, dq);
  p.dk_per_qhead = dk_h.data_ptr<float>();
  p.dv_per_qhead = dv_h.data_ptr<float>();
  attention_bwd_dispatch(p);

  // Sum the per-query-head contributions of each GQA group (a no-op view for MHA).
  const int64_t group = Hkv > 0 ? Hq / Hkv : 1;
  at::Tensor dk = group == 1 ? dk_h : dk_h.view({B, Hkv, group, Lk, D}).sum(2);
  at::Tensor dv = group == 1 ? dv_h : dv_h.view({B, Hkv, group, Lk, Dv}).sum(2);
  return {dq, dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fusedattn::cpu
