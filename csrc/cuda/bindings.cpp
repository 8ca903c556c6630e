// CUDA implementations of the fusedattn ops (schemas in csrc/torch_bindings.cpp): argument checks, output
// and scratch allocation, then a launch of the torch-free kernels in this directory (params.h). The argument
// checks are csrc/checks.h's, shared with the CPU bindings; this file adds only the CUDA kernels' rules, so
// that direct torch.ops.fusedattn calls never launch a kernel on arguments it cannot handle. Cases the kernels
// do not cover (float32, head dims other than 64 / 128 / 256, Dv != D, attn_mask, softcap in attention_fwd/bwd)
// raise an error that names the case, so that the Python dispatcher can route them to another backend.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "cuda/params.h"
#include "params_fill.h"

namespace fusedattn::cuda {
namespace {

constexpr int64_t MIN_KEYS_PER_SPLIT = 256;  // below this, a split's partial state costs more than it gains
constexpr int64_t MAX_GRID_YZ = 65535;

template <typename T> struct Tag { using type = T; };

// Calls fn(Tag<T>{}, std::integral_constant<int, D>{}) for q's dtype and head dim D, or raises naming the case.
template <typename Fn> void dispatch_dtype_hdim(at::ScalarType st, int64_t D, const char* op, Fn&& fn) {
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, "fusedattn (cuda): ", op,
              " supports float16 and bfloat16 on the CUDA kernels, got ", st,
              " (use backend=\"triton\" or \"reference\" for other dtypes)");
  auto with_dtype = [&](auto tag) {
    switch (D) {
      case 64: fn(tag, std::integral_constant<int, 64>{}); break;
      case 128: fn(tag, std::integral_constant<int, 128>{}); break;
      case 256: fn(tag, std::integral_constant<int, 256>{}); break;
      default:
        TORCH_CHECK(false, "fusedattn (cuda): ", op, " has CUDA kernels for head dims 64, 128 and 256, got ", D,
                    " (use backend=\"triton\" or \"reference\")");
    }
  };
  if (st == at::kHalf) with_dtype(Tag<__half>{});
  else with_dtype(Tag<__nv_bfloat16>{});
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fusedattn (cuda): ", what, " failed to launch: ", cudaGetErrorString(err));
}

// Tensors on the CUDA device of the op's first tensor argument (q, or out_a). Dtypes are left to
// dispatch_dtype_hdim, which names the op and the dtypes its kernels take.
struct CudaRules final : DeviceRules {
  CudaRules(const at::Tensor& first, const char* first_name)
      : DeviceRules("cuda"), dev(first.device()), first_name(first_name) {}
  at::Device dev;
  const char* first_name;
  void on_device(const at::Tensor& t, const char* name) const override {
    FUSEDATTN_CHECK(*this, t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
    FUSEDATTN_CHECK(*this, t.device() == dev, name, " must be on ", dev, " like ", first_name, ", got ", t.device());
  }
};

// The kernels copy rows with 16-byte cp.async: unit stride along D, every other stride a multiple of
// 8 elements and a 16-byte aligned start. Anything else gets a fresh contiguous copy (clone, not
// contiguous(): a contiguous view can still start misaligned).
bool tile_ready(const at::Tensor& t) {
  if (t.stride(-1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}
at::Tensor tileable(const at::Tensor& t) {
  if (t.numel() == 0 || tile_ready(t)) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

// What the CUDA attention kernels need beyond check_qkv: Dv == D, batch and heads within the grid.
void check_cuda_qkv(const CudaRules& r, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const char* op) {
  check_qkv(r, QkvLayout::kDense, q, k, v);
  FUSEDATTN_CHECK(r, v.size(3) == q.size(3), op, " needs the value head dim to equal the query head dim on the "
                  "CUDA kernels, got Dv = ", v.size(3), " and D = ", q.size(3));
  FUSEDATTN_CHECK(r, q.size(0) <= MAX_GRID_YZ && q.size(1) <= MAX_GRID_YZ, "batch (", q.size(0),
                  ") and query heads (", q.size(1), ") must each be at most ", MAX_GRID_YZ);
}

void check_options(const CudaRules& r, const std::optional<at::Tensor>& attn_mask, int64_t left, int64_t right,
                   double scale, double softcap, const char* op) {
  FUSEDATTN_CHECK(r, !attn_mask.has_value(), op, " has no attn_mask support on the CUDA kernels (use "
                  "backend=\"triton\" or \"reference\" for a custom mask; causal and window masks are built in)");
  check_scalars(r, left, right, scale, softcap);
  FUSEDATTN_CHECK(r, softcap == 0, op, " has no softcap support on the CUDA kernels, got softcap = ", softcap,
                  " (use backend=\"triton\" or \"reference\")");
}

template <typename P>
void fill_attention(P& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                    int64_t left, int64_t right, bool bottom_right) {
  fill_qkv(p, q, k, v);
  p.scale = static_cast<float>(scale);
  p.window_left = normalize_window(left, p.Lq + p.Lk);
  p.window_right = normalize_window(right, p.Lq + p.Lk);
  p.diag_offset = bottom_right ? p.Lk - p.Lq : 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in,
                                                      const std::optional<at::Tensor>& attn_mask, double scale,
                                                      int64_t window_left, int64_t window_right, bool bottom_right,
                                                      double softcap) {
  const CudaRules r(q_in, "q");
  check_cuda_qkv(r, q_in, k_in, v_in, "attention_fwd");
  check_options(r, attn_mask, window_left, window_right, scale, softcap, "attention_fwd");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  at::Tensor out = at::empty({B, Hq, Lq, D}, q_in.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q_in.options().dtype(at::kFloat));
  dispatch_dtype_hdim(q_in.scalar_type(), D, "attention_fwd", [](auto, auto) {});  // the case is supported
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (D == 0 || k_in.size(2) == 0) {  // no keys: every row sees nothing
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  const at::Tensor q = tileable(q_in), k = tileable(k_in), v = tileable(v_in);
  AttnFwdParams p{};
  fill_attention(p, q, k, v, scale, window_left, window_right, bottom_right);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype_hdim(q.scalar_type(), D, "attention_fwd", [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    check_launch(attention_fwd_launch<T, decltype(hd)::value>(p, stream), "attention_fwd");
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& grad_lse) {
  const CudaRules r(q_in, "q");
  check_cuda_qkv(r, q_in, k_in, v_in, "attention_bwd");
  check_options(r, attn_mask, window_left, window_right, scale, softcap, "attention_bwd");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Hkv = k_in.size(1), Lq = q_in.size(2), Lk = k_in.size(2),
                D = q_in.size(3);
  const std::vector<int64_t> o_shape{B, Hq, Lq, D}, l_shape{B, Hq, Lq};
  check_backward(r, q_in, grad_out, out, lse, grad_lse, o_shape, l_shape);
  dispatch_dtype_hdim(q_in.scalar_type(), D, "attention_bwd", [](auto, auto) {});
  at::Tensor dq = at::empty({B, Hq, Lq, D}, q_in.options());
  at::Tensor dk = at::empty({B, Hkv, Lk, D}, q_in.options());
  at::Tensor dv = at::empty({B, Hkv, Lk, D}, q_in.options());
  if (B * Hq * Lq == 0 || Lk == 0 || D == 0) {  // nothing attends to anything: all gradients are 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  // delta_i = sum_d dout_id * out_id (- dlse_i): the softmax Jacobian's row term.
  at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (grad_lse.has_value()) delta = delta - grad_lse->to(at::kFloat);
  delta = delta.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor q = tileable(q_in), k = tileable(k_in), v = tileable(v_in), dout = tileable(grad_out);
  AttnBwdParams p{};
  fill_attention(p, q, k, v, scale, window_left, window_right, bottom_right);
  p.dout = dout.data_ptr();
  copy_strides(p.dout_stride, dout);
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype_hdim(q.scalar_type(), D, "attention_bwd", [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    check_launch(attention_bwd_launch<T, decltype(hd)::value>(p, stream), "attention_bwd");
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> decode_fwd_cuda(const DecodeInputs& in) {
  const at::Tensor &q_in = in.q, &k_cache = in.k_cache, &v_cache = in.v_cache;
  const CudaRules r(q_in, "q");
  const DecodeShape s = check_decode(r, in);
  const int64_t B = s.B, Lq = s.Lq, Hq = s.Hq, Hkv = s.Hkv, D = s.D, Lnew = s.Lnew, capacity = s.capacity;
  FUSEDATTN_CHECK(r, s.Dv == D, "decode_fwd needs the value head dim to equal the query head dim on the CUDA "
                  "kernels, got Dv = ", s.Dv, " and D = ", D);
  // The caches are updated in place, so they cannot be copied into a friendlier layout: require it.
  FUSEDATTN_CHECK(r, k_cache.numel() == 0 || (tile_ready(k_cache) && tile_ready(v_cache)),
                  "k_cache and v_cache must start 16-byte aligned with strides that are multiples of 8 elements on "
                  "the CUDA kernels, got strides ", k_cache.strides(), " and ", v_cache.strides());
  FUSEDATTN_CHECK(r, B <= MAX_GRID_YZ && Hkv <= MAX_GRID_YZ, "batch (", B, ") and kv heads (", Hkv,
                  ") must each be at most ", MAX_GRID_YZ);
  FUSEDATTN_CHECK(r, capacity < (int64_t(1) << 31), "the cache holds ", capacity, " positions per sequence; the "
                  "CUDA decode kernel indexes them with 32 bits (< 2^31)");
  dispatch_dtype_hdim(q_in.scalar_type(), D, "decode_fwd", [](auto, auto) {});

  const at::Device dev = q_in.device();
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({B, Lq, Hq, D}, q_in.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q_in.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};
  const at::Tensor q = tileable(q_in), seqlens = in.cache_seqlens.contiguous();
  const at::Tensor bt = s.paged ? in.block_table->contiguous() : at::Tensor();
  const at::Tensor cbi = in.cache_batch_idx.has_value() ? in.cache_batch_idx->contiguous() : at::Tensor();

  // Splits (num_splits = 0): enough CTAs for two waves over the SMs, each split keeping MIN_KEYS_PER_SPLIT
  // keys of the longest possible sequence (the lengths themselves live on the device; reading them would sync).
  const int64_t row_chunks = (Lq * (Hq / Hkv) + DECODE_ROWS_PER_CTA - 1) / DECODE_ROWS_PER_CTA;
  const int64_t max_keys = decode_keys_read(s, capacity);
  int64_t S = in.num_splits;
  if (S == 0) {
    int sms = 0;
    check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()), "decode_fwd (SM count)");
    const int64_t ctas = B * Hkv * row_chunks;
    S = std::clamp<int64_t>((2 * sms + ctas - 1) / ctas, 1, std::max<int64_t>(1, max_keys / MIN_KEYS_PER_SPLIT));
    S = std::min<int64_t>(S, 128);
  }
  S = cap_splits(S, max_keys);
  TORCH_CHECK(S * row_chunks < (int64_t(1) << 31), "fusedattn (cuda): too many query rows per kv head (",
              Lq * (Hq / Hkv), ") for the decode grid");
  at::Tensor out_partial = at::empty({S, B, Lq, Hq, D}, q_in.options().dtype(at::kFloat));
  at::Tensor lse_partial = at::empty({S, B, Hq, Lq}, q_in.options().dtype(at::kFloat));

  DecodeParams p{};
  const DecodeInputs tiled{q, k_cache, v_cache, in.cache_seqlens, in.k_new, in.v_new, in.block_table,
                          in.cache_batch_idx, in.scale, in.window_left, in.window_right, in.softcap, in.num_splits};
  fill_decode(p, s, tiled, seqlens, bt, cbi);
  p.num_splits = S;
  p.out_partial = out_partial.data_ptr<float>();
  p.lse_partial = lse_partial.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype_hdim(q.scalar_type(), D, "decode_fwd", [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    constexpr int kD = decltype(hd)::value;
    if (Lnew > 0) check_launch(decode_append_launch<T, kD>(p, stream), "decode_fwd (append)");
    if (Lq > 0 && Hq > 0) check_launch(decode_fwd_launch<T, kD>(p, stream), "decode_fwd");
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                               const at::Tensor& out_b, const at::Tensor& lse_b) {
  const CudaRules r(out_a, "out_a");
  check_merge(r, out_a, lse_a, out_b, lse_b);
  const c10::cuda::CUDAGuard guard(out_a.device());
  const MergeTensors m = merge_tensors(out_a, lse_a, out_b);
  if (m.out.numel() == 0 && m.lse.numel() == 0) return {m.out, m.lse};
  MergeParams p{};
  fill_merge(p, m, lse_a, lse_b);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  const at::ScalarType st = out_a.scalar_type();
  if (st == at::kFloat) err = merge_attention_states_launch<float>(p, stream);
  else if (st == at::kHalf) err = merge_attention_states_launch<__half>(p, stream);
  else err = merge_attention_states_launch<__nv_bfloat16>(p, stream);
  check_launch(err, "merge_attention_states");
  return {m.out, m.lse};
}

TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("decode_fwd", &decode_fwd_op<&decode_fwd_cuda>);
  m.impl("merge_attention_states", &merge_attention_states_cuda);
}

}  // namespace fusedattn::cuda
