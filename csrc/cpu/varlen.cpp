// CPU implementations of fusedattn::varlen_fwd / varlen_bwd: attention over packed sequences
// (FlashAttention's flash_attn_varlen_func layout). q (total_q, Hq, D), k (total_k, Hkv, D),
// v (total_k, Hkv, Dv); sequence b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1 of each.
//
// The sequences run through the dense kernels of attention_kernel.cpp: a run of consecutive
// sequences with the same (Lq, Lk) is one call on a strided (n, H, L, D) view of the packed rows
// (no copy of q, k, v, out or dq), and the kernels' parallelism (batch x heads x query blocks
// forward, batch x heads backward) comes from inside each call.
// Limitation: runs go one after another, so many tiny sequences of *different* lengths (a few
// tokens each, few heads) leave cores idle and pay a fork/join per run; a kernel that takes
// cu_seqlens itself and schedules (sequence, head, block) tasks together would fix that.
//
// The argument checks are csrc/checks.h's (shared with the dense op and the CUDA bindings); this file adds
// the cu_seqlens values', so that direct torch.ops.fusedattn calls and compiled graphs (where the Python
// wrapper skips its value checks) never read or write out of bounds.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/attention.h"
#include "cpu/attention_common.h"

namespace fusedattn::cpu {
namespace {

// Checks one cu_seqlens tensor against its packed tensor and returns its entries (read once: the
// kernels then only follow these validated copies).
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen,
                                     const char* max_name) {
  kCpu.device(cu, name);
  TORCH_CHECK(cu.scalar_type() == at::kInt, "fusedattn (cpu): ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "fusedattn (cpu): ", name,
              " must be 1-D of shape (B + 1,), got shape ", cu.sizes());
  TORCH_CHECK(max_seqlen >= 0, "fusedattn (cpu): ", max_name, " must be >= 0, got ", max_seqlen);
  const auto acc = cu.accessor<int32_t, 1>();
  std::vector<int64_t> out(cu.size(0));
  for (int64_t i = 0; i < cu.size(0); ++i) out[i] = acc[i];
  TORCH_CHECK(out[0] == 0, "fusedattn (cpu): ", name, "[0] must be 0, got ", out[0]);
  for (size_t b = 0; b + 1 < out.size(); ++b) {
    const int64_t len = out[b + 1] - out[b];
    TORCH_CHECK(len >= 0, "fusedattn (cpu): ", name, " must be non-decreasing, got ", name, "[", b, "] = ",
                out[b], " > ", name, "[", b + 1, "] = ", out[b + 1]);
    TORCH_CHECK(len <= max_seqlen, "fusedattn (cpu): sequence ", b, " has length ", len, " (from ", name,
                ") > ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK(out.back() == total, "fusedattn (cpu): the last entry of ", name, " (", out.back(),
              ") must equal the number of packed tokens (", total, ")");
  return out;
}

struct Seqs {
  std::vector<int64_t> cu_q, cu_k;
  int64_t max_q = 0, max_k = 0;  // longest actual lengths
  int64_t size() const { return static_cast<int64_t>(cu_q.size()) - 1; }
};

Seqs check_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
               const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
               int64_t window_right, double scale, double softcap) {
  check_qkv(kCpu, QkvLayout::kPacked, q, k, v);
  check_scalars(kCpu, window_left, window_right, scale, softcap);
  Seqs s;
  s.cu_q = read_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.size(0), max_seqlen_q, "max_seqlen_q");
  s.cu_k = read_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.size(0), max_seqlen_k, "max_seqlen_k");
  TORCH_CHECK(s.cu_q.size() == s.cu_k.size(), "fusedattn (cpu): cu_seqlens_q and cu_seqlens_k must have the same "
              "length (B + 1), got ", s.cu_q.size(), " and ", s.cu_k.size());
  for (int64_t b = 0; b < s.size(); ++b) {
    s.max_q = std::max(s.max_q, s.cu_q[b + 1] - s.cu_q[b]);
    s.max_k = std::max(s.max_k, s.cu_k[b + 1] - s.cu_k[b]);
  }
  check_sizes(1, q.size(1), s.max_q, s.max_k, q.size(2), v.size(2));
  return s;
}

// n sequences of len rows each, starting at row `start` of a packed (total, H, E) tensor, as the
// kernels' (n, H, len, E) view (splitting the token dimension is always a view).
at::Tensor seq_view(const at::Tensor& t, int64_t start, int64_t n, int64_t len) {
  return t.narrow(0, start, n * len).unflatten(0, {n, len}).transpose(1, 2);
}

// The same for the (H, total) lse layout: (n, H, len), rows contiguous.
at::Tensor lse_view(const at::Tensor& t, int64_t start, int64_t n, int64_t len) {
  return t.narrow(1, start, n * len).unflatten(1, {n, len}).transpose(0, 1);
}

// Consecutive sequences b .. b + n - 1 with the same query and key lengths: one kernel call.
struct Run {
  int64_t sq, sk, n, Lq, Lk;  // first query / key row, sequences, lengths
};

std::vector<Run> equal_length_runs(const Seqs& s) {
  std::vector<Run> runs;
  for (int64_t b = 0; b < s.size(); ++b) {
    const int64_t Lq = s.cu_q[b + 1] - s.cu_q[b], Lk = s.cu_k[b + 1] - s.cu_k[b];
    if (!runs.empty() && runs.back().Lq == Lq && runs.back().Lk == Lk)
      ++runs.back().n;
    else
      runs.push_back({s.cu_q[b], s.cu_k[b], 1, Lq, Lk});
  }
  return runs;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                  int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                                  int64_t window_left, int64_t window_right, bool bottom_right,
                                                  double softcap) {
  const Seqs s = check_all(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                           window_right, scale, softcap);
  const int64_t total_q = q.size(0), Hq = q.size(1), Dv = v.size(2);
  at::Tensor out = at::empty({total_q, Hq, Dv}, q.options());                 // (total_q, Hq, Dv)
  at::Tensor lse = at::empty({Hq, total_q}, q.options().dtype(at::kFloat));  // (Hq, total_q)
  if (lse.numel() == 0) return {out, lse};
  for (const Run& r : equal_length_runs(s)) {
    if (r.Lq == 0) continue;
    if (r.Lk == 0) {  // no key to see: output 0, lse -inf
      out.narrow(0, r.sq, r.n * r.Lq).zero_();
      lse.narrow(1, r.sq, r.n * r.Lq).fill_(-std::numeric_limits<float>::infinity());
      continue;
    }
    check_sizes(r.n, Hq, r.Lq, r.Lk, q.size(2), Dv);
    AttnFwdParams p{};
    fill_common(p, seq_view(q, r.sq, r.n, r.Lq), seq_view(k, r.sk, r.n, r.Lk), seq_view(v, r.sk, r.n, r.Lk), scale,
                window_left, window_right, bottom_right, softcap, nullptr);
    const at::Tensor out_r = seq_view(out, r.sq, r.n, r.Lq);  // (n, Hq, Lq, Dv), rows Hq * Dv apart
    const at::Tensor lse_r = lse_view(lse, r.sq, r.n, r.Lq);  // (n, Hq, Lq), heads total_q apart
    p.out = out_r.data_ptr();
    copy_strides(p.out_stride, out_r);
    p.lse = lse_r.data_ptr<float>();
    copy_strides(p.lse_stride, lse_r);
    attention_fwd_dispatch(p);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, bool bottom_right,
    double softcap, const std::optional<at::Tensor>& grad_lse) {
  const Seqs s = check_all(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                           window_right, scale, softcap);
  const int64_t total_q = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2), Dv = v.size(2);
  const std::vector<int64_t> o_shape{total_q, Hq, Dv}, l_shape{Hq, total_q};
  check_backward(kCpu, q, grad_out, out, lse, grad_lse, o_shape, l_shape);

  // Rows of a sequence with no key, and keys of a sequence with no query, get zero gradient.
  at::Tensor dq = at::zeros({total_q, Hq, D}, q.options());
  at::Tensor dk = at::zeros({k.size(0), Hkv, D}, k.options());
  at::Tensor dv = at::zeros({v.size(0), Hkv, Dv}, v.options());
  if (Hq == 0 || total_q == 0 || k.size(0) == 0) return {dq, dk, dv};

  // delta_i = sum_d dout_id * out_id  (- dlse_i): the softmax Jacobian's row term, (Hq, total_q) like lse.
  at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).t();
  if (grad_lse.has_value()) delta = delta - grad_lse->to(at::kFloat);
  delta = delta.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  // The kernel writes each query head's dK/dV contribution (fp32, (n, Hq, Lk, D)); one buffer sized for
  // the largest run serves them all, and each GQA group is summed into the packed dk/dv.
  const std::vector<Run> runs = equal_length_runs(s);
  int64_t max_run_k = 0;
  for (const Run& r : runs) {
    if (r.Lq == 0 || r.Lk == 0) continue;
    check_sizes(r.n, Hq, r.Lq, r.Lk, D, Dv);  // bounds n * Hq * Lk * D before the buffers are sized by it
    max_run_k = std::max(max_run_k, r.n * r.Lk);
  }
  const int64_t group = Hq / Hkv;
  at::Tensor dk_h = at::empty({Hq * max_run_k * D}, q.options().dtype(at::kFloat));
  at::Tensor dv_h = at::empty({Hq * max_run_k * Dv}, q.options().dtype(at::kFloat));

  for (const Run& r : runs) {
    if (r.Lq == 0 || r.Lk == 0) continue;
    AttnBwdParams p{};
    fill_common(p, seq_view(q, r.sq, r.n, r.Lq), seq_view(k, r.sk, r.n, r.Lk), seq_view(v, r.sk, r.n, r.Lk), scale,
                window_left, window_right, bottom_right, softcap, nullptr);
    const at::Tensor dout_r = seq_view(grad_out, r.sq, r.n, r.Lq);
    p.dout = dout_r.data_ptr();
    copy_strides(p.dout_stride, dout_r);
    const at::Tensor lse_r = lse_view(lse_c, r.sq, r.n, r.Lq), delta_r = lse_view(delta, r.sq, r.n, r.Lq);
    p.lse = lse_r.data_ptr<float>();
    p.delta = delta_r.data_ptr<float>();
    copy_strides(p.lse_stride, lse_r);  // delta: same shape and strides
    const at::Tensor dq_r = seq_view(dq, r.sq, r.n, r.Lq);
    p.dq = dq_r.data_ptr();
    copy_strides(p.dq_stride, dq_r);
    const at::Tensor dk_r = dk_h.narrow(0, 0, r.n * Hq * r.Lk * D).view({r.n, Hkv, group, r.Lk, D});
    const at::Tensor dv_r = dv_h.narrow(0, 0, r.n * Hq * r.Lk * Dv).view({r.n, Hkv, group, r.Lk, Dv});
    p.dk_per_qhead = dk_r.data_ptr<float>();
    p.dv_per_qhead = dv_r.data_ptr<float>();
    attention_bwd_dispatch(p);
    // (n, Hkv, group, Lk, D) -> sum over the group -> (n, Lk, Hkv, D) rows of the packed gradient
    dk.narrow(0, r.sk, r.n * r.Lk).unflatten(0, {r.n, r.Lk}).copy_(dk_r.sum(2).transpose(1, 2));
    dv.narrow(0, r.sk, r.n * r.Lk).unflatten(0, {r.n, r.Lk}).copy_(dv_r.sum(2).transpose(1, 2));
  }
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("varlen_fwd", &varlen_fwd_cpu);
  m.impl("varlen_bwd", &varlen_bwd_cpu);
}

}  // namespace fusedattn::cpu
