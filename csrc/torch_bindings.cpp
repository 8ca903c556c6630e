// Every fusedattn op schema, declared once. Kernels register per dispatch key elsewhere:
//   CPU  -> csrc/cpu/attention.cpp, csrc/cpu/varlen.cpp, csrc/cpu/decode.cpp (TORCH_LIBRARY_IMPL(fusedattn, CPU, m))
//   CUDA -> csrc/cuda/bindings.cpp (TORCH_LIBRARY_IMPL(fusedattn, CUDA, m)), when torch has CUDA
// Fake (meta) implementations and autograd live in fusedattn/_ops.py, which torch imports on
// demand through set_python_module when it needs them (e.g. under torch.compile). The one op that writes its
// inputs, decode_fwd, also has an ADInplaceOrView kernel (the version-counter bookkeeping, bottom of this file).
#include <torch/csrc/autograd/VariableTypeUtils.h>
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
  // Variable-length (packed) attention, FlashAttention's flash_attn_varlen_func layout.
  //   q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), Hq % Hkv == 0, any strides.
  //   cu_seqlens_q / cu_seqlens_k (B + 1,) int32: sequence b owns rows cu[b] .. cu[b+1]-1; cu[0] = 0,
  //   non-decreasing, cu[B] = total. Lengths may be 0 and must be <= max_seqlen_q / max_seqlen_k.
  //   Masking per sequence as in attention_fwd, off = Lk_b - Lq_b if bottom_right else 0.
  //   Returns out (total_q, Hq, Dv) in q's dtype and lse (Hq, total_q) float32 (FlashAttention's
  //   varlen lse layout; -inf for a row that sees no key, whose output is 0).
  m.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, int window_left, int window_right, bool bottom_right, float softcap) "
      "-> (Tensor out, Tensor lse)");
  // Backward of varlen_fwd. grad_lse (optional, (Hq, total_q)): gradient flowing into lse.
  m.def(
      "varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
      "bool bottom_right, float softcap, Tensor? grad_lse) -> (Tensor dq, Tensor dk, Tensor dv)");
  // KV-cache decoding (FlashAttention's flash_attn_with_kvcache layout and semantics).
  //   q (B, Lq, Hq, D). Cache: contiguous (B_cache, L_max, Hkv, D) / (.., Dv), or paged
  //   (num_blocks, PAGE_SIZE, Hkv, D) with block_table (B, max_blocks) int32; last dim contiguous.
  //   cache_seqlens (B,) int32: keys already in the cache. k_new (B, Lnew, Hkv, D) / v_new
  //   (B, Lnew, Hkv, Dv), when given, are first written into the caches in place at positions
  //   cache_seqlens[b] .. +Lnew-1 (hence the (a!) (b!)); the caller advances cache_seqlens.
  //   cache_batch_idx (B,) int32: cache row of each sequence (contiguous cache only).
  //   Query i sees key j iff Lk - Lq + i - window_left <= j <= Lk - Lq + i + window_right,
  //   Lk = cache_seqlens[b] + Lnew (bottom-right; causal: window_right = 0; -1 = unbounded).
  //   num_splits: key-range splits per (b, kv head), combined by a log-sum-exp merge; 0 = heuristic.
  //   Returns out (B, Lq, Hq, Dv) in q's dtype and lse (B, Hq, Lq) float32 (-inf, out 0: no key).
  m.def(
      "decode_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
      "Tensor? v_new, Tensor? block_table, Tensor? cache_batch_idx, float scale, int window_left, "
      "int window_right, float softcap, int num_splits) -> (Tensor out, Tensor lse)");
  // Log-sum-exp merge of two attention states over disjoint key sets:
  //   out_a, out_b (B, L, H, D), lse_a, lse_b (B, H, L) float32 -> out (B, L, H, D), lse (B, H, L).
  //   Both lse -inf: out 0, lse -inf.
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor out, Tensor lse)");
}

// decode_fwd writes k_cache and v_cache in place (the (a!) (b!) above). Its ADInplaceOrView kernel does the
// bookkeeping of torch's in-place ops, as torch.library.custom_op's does for its mutates_args: it bumps the version
// counter of every argument the schema marks written, before the kernel runs, so that a cache saved for backward
// by another op and then appended into raises "modified by an inplace operation" at backward. (An inference tensor
// has no version counter and no ADInplaceOrView key: check_decode refuses appends into one outside
// torch.inference_mode(), as torch's in-place ops do.)
namespace {
void decode_fwd_inplace_or_view(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t n = schema.arguments().size(), first = stack->size() - n;
  for (size_t i = 0; i < n; ++i) {
    const c10::IValue& arg = (*stack)[first + i];
    if (arg.isTensor() && schema.is_mutable({c10::SchemaArgType::input, i})) {
      const at::Tensor& t = arg.toTensor();
      if (!t.is_inference()) torch::autograd::increment_version(t);
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, ADInplaceOrView, m) {
  m.impl("decode_fwd", torch::CppFunction::makeFromBoxedFunction<&decode_fwd_inplace_or_view>());
}
