// Every fusedattn op schema, declared once. Kernels register per dispatch key elsewhere:
//   CPU  -> csrc/cpu/attention.cpp (TORCH_LIBRARY_IMPL(fusedattn, CPU, m))
// Fake (meta) implementations and autograd live in fusedattn/_ops.py, which torch imports on
// demand through set_python_module when it needs them (e.g. under torch.compile).
#include <torch/library.h>

TORCH_LIBRARY(fusedattn, m) {
  m.set_python_module("fusedattn._ops");
  // Flash-style attention forward.
  //   q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), Hq % Hkv == 0, any strides.
  //   attn_mask: additive, broadcastable to (B, Hq, Lq, Lk) (bool masks are converted).
  //   Key j is visible to query i iff i + off - window_left <= j <= i + off + window_right,
  //   off = Lk - Lq if bottom_right else 0, -1 = unbounded (causal: window_right = 0).
  //   softcap > 0: scores = softcap * tanh(scale * q.k / softcap) before the mask.
  //   Returns out (B, Hq, Lq, Dv) in q's dtype and lse (B, Hq, Lq) float32 (natural log;
  //   -inf for a row that sees no key, whose output is 0).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int window_left, "
      "int window_right, bool bottom_right, float softcap) -> (Tensor out, Tensor lse)");
  // Backward of attention_fwd (recomputes the scores tile by tile from q, k and lse).
  //   grad_lse (optional): gradient flowing into lse. dk/dv are summed over each GQA group.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? attn_mask, float scale, int window_left, int window_right, bool bottom_right, "
      "float softcap, Tensor? grad_lse) -> (Tensor dq, Tensor dk, Tensor dv)");
}
