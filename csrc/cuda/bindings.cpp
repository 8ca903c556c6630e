// CUDA implementations of the fusedattn ops (schemas in csrc/torch_bindings.cpp): argument checks, output
// and scratch allocation, then a launch of the torch-free kernels in this directory (params.h). Like the CPU
// front-end (csrc/cpu/attention.cpp), the Python wrappers validate first; these TORCH_CHECKs keep direct
// torch.ops.fusedattn calls from launching a kernel on arguments it cannot handle. Cases the kernels do not
// cover (float32, head dims other than 64 / 128 / 256, Dv != D, attn_mask, softcap in attention_fwd/bwd)
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

#include "cuda/params.h"

namespace fusedattn::cuda {
namespace {

constexpr int64_t MAX_SPLITS = 1024;        // as on the CPU (decode.cpp)
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

void check_cuda(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "fusedattn (cuda): ", name, " must be on ", dev, " like q, got ", t.device());
}

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

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.dim() == 4, "fusedattn (cuda): q must be 4-D (B, Hq, Lq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "fusedattn (cuda): k must be 4-D (B, Hkv, Lk, D), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "fusedattn (cuda): v must be 4-D (B, Hkv, Lk, Dv), got shape ", v.sizes());
  TORCH_CHECK(q.is_cuda(), "fusedattn (cuda): q must be a CUDA tensor, got ", q.device());
  check_cuda(k, "k", q.device());
  check_cuda(v, "v", q.device());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fusedattn (cuda): q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "fusedattn (cuda): batch sizes differ: q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(v.size(1) == k.size(1), "fusedattn (cuda): k and v must have the same number of heads, got ",
              k.size(1), " and ", v.size(1));
  TORCH_CHECK(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0,
              "fusedattn (cuda): the number of query heads (", q.size(1),
              ") must be a multiple of the number of kv heads (", k.size(1), ")");
  TORCH_CHECK(k.size(3) == q.size(3), "fusedattn (cuda): k head dim ", k.size(3), " != q head dim ", q.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "fusedattn (cuda): v length ", v.size(2), " != k length ", k.size(2));
  TORCH_CHECK(v.size(3) == q.size(3), "fusedattn (cuda): ", op, " needs the value head dim to equal the query ",
              "head dim on the CUDA kernels, got Dv = ", v.size(3), " and D = ", q.size(3));
  TORCH_CHECK(q.size(0) <= MAX_GRID_YZ && q.size(1) <= MAX_GRID_YZ, "fusedattn (cuda): batch (", q.size(0),
              ") and query heads (", q.size(1), ") must each be at most ", MAX_GRID_YZ);
}

void check_options(const std::optional<at::Tensor>& attn_mask, int64_t left, int64_t right, double scale,
                   double softcap, const char* op) {
  TORCH_CHECK(!attn_mask.has_value(), "fusedattn (cuda): ", op, " has no attn_mask support on the CUDA kernels ",
              "(use backend=\"triton\" or \"reference\" for a custom mask; causal and window masks are built in)");
  TORCH_CHECK(left >= -1 && right >= -1, "fusedattn (cuda): window sizes must be >= 0 or -1 (unbounded), got (",
              left, ", ", right, ")");
  TORCH_CHECK(std::isfinite(scale), "fusedattn (cuda): scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "fusedattn (cuda): softcap must be >= 0, got ", softcap);
  TORCH_CHECK(softcap == 0, "fusedattn (cuda): ", op, " has no softcap support on the CUDA kernels, got softcap = ",
              softcap, " (use backend=\"triton\" or \"reference\")");
}

// A window side wider than any distance in the problem hides nothing: -1, so the kernels' band arithmetic
// never overflows int64.
int64_t normalize_window(int64_t w, int64_t span) { return w > span ? -1 : w; }

template <typename P>
void fill_qkv(P& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t left,
              int64_t right, bool bottom_right) {
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Hkv = k.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.D = q.size(3);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int d = 0; d < 4; ++d) {
    p.q_stride[d] = q.stride(d);
    p.k_stride[d] = k.stride(d);
    p.v_stride[d] = v.stride(d);
  }
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
  check_qkv(q_in, k_in, v_in, "attention_fwd");
  check_options(attn_mask, window_left, window_right, scale, softcap, "attention_fwd");
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
  fill_qkv(p, q, k, v, scale, window_left, window_right, bottom_right);
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
  check_qkv(q_in, k_in, v_in, "attention_bwd");
  check_options(attn_mask, window_left, window_right, scale, softcap, "attention_bwd");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Hkv = k_in.size(1), Lq = q_in.size(2), Lk = k_in.size(2),
                D = q_in.size(3);
  const std::vector<int64_t> o_shape{B, Hq, Lq, D}, l_shape{B, Hq, Lq};
  TORCH_CHECK(grad_out.sizes() == o_shape && grad_out.scalar_type() == q_in.scalar_type(),
              "fusedattn (cuda): grad_out must be a ", q_in.scalar_type(), " tensor of shape ", o_shape, ", got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == o_shape, "fusedattn (cuda): out must have shape ", o_shape, ", got ", out.sizes());
  TORCH_CHECK(lse.sizes() == l_shape && lse.scalar_type() == at::kFloat,
              "fusedattn (cuda): lse must be a float32 tensor of shape ", l_shape, ", got ", lse.scalar_type(), " ",
              lse.sizes());
  check_cuda(grad_out, "grad_out", q_in.device());
  check_cuda(out, "out", q_in.device());
  check_cuda(lse, "lse", q_in.device());
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->sizes() == l_shape, "fusedattn (cuda): grad_lse must have shape ", l_shape, ", got ",
                grad_lse->sizes());
    check_cuda(*grad_lse, "grad_lse", q_in.device());
  }
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
  fill_qkv(p, q, k, v, scale, window_left, window_right, bottom_right);
  p.dout = dout.data_ptr();
  for (int d = 0; d < 4; ++d) p.dout_stride[d] = dout.stride(d);
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

std::tuple<at::Tensor, at::Tensor> decode_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                   const std::optional<at::Tensor>& k_new,
                                                   const std::optional<at::Tensor>& v_new,
                                                   const std::optional<at::Tensor>& block_table,
                                                   const std::optional<at::Tensor>& cache_batch_idx, double scale,
                                                   int64_t window_left, int64_t window_right, double softcap,
                                                   int64_t num_splits) {
  TORCH_CHECK(q_in.dim() == 4, "fusedattn (cuda): q must be 4-D (B, Lq, Hq, D), got shape ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "fusedattn (cuda): k_cache must be 4-D (B_cache, L_max, Hkv, D) or paged "
              "(num_blocks, PAGE_SIZE, Hkv, D), got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.dim() == 4, "fusedattn (cuda): v_cache must be 4-D like k_cache, got shape ", v_cache.sizes());
  TORCH_CHECK(q_in.is_cuda(), "fusedattn (cuda): q must be a CUDA tensor, got ", q_in.device());
  const at::Device dev = q_in.device();
  check_cuda(k_cache, "k_cache", dev);
  check_cuda(v_cache, "v_cache", dev);
  check_cuda(cache_seqlens, "cache_seqlens", dev);
  TORCH_CHECK(k_cache.scalar_type() == q_in.scalar_type() && v_cache.scalar_type() == q_in.scalar_type(),
              "fusedattn (cuda): k_cache and v_cache must have q's dtype ", q_in.scalar_type(), ", got ",
              k_cache.scalar_type(), " and ", v_cache.scalar_type());
  const int64_t B = q_in.size(0), Lq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) && v_cache.size(2) == Hkv,
              "fusedattn (cuda): v_cache must match k_cache in all but the head dim, got k_cache ", k_cache.sizes(),
              ", v_cache ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(3) == D, "fusedattn (cuda): k_cache head dim ", k_cache.size(3), " != q head dim ", D);
  TORCH_CHECK(v_cache.size(3) == D, "fusedattn (cuda): decode_fwd needs the value head dim to equal the query head ",
              "dim on the CUDA kernels, got Dv = ", v_cache.size(3), " and D = ", D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fusedattn (cuda): the number of query heads in q (", Hq,
              ") must be a multiple of the number of kv heads in k_cache (", Hkv, ")");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "fusedattn (cuda): k_cache and v_cache must have a contiguous last (head) dimension, got strides ",
              k_cache.strides(), " and ", v_cache.strides());
  // The caches are updated in place, so they cannot be copied into a friendlier layout: require it.
  TORCH_CHECK(k_cache.numel() == 0 || (tile_ready(k_cache) && tile_ready(v_cache)),
              "fusedattn (cuda): k_cache and v_cache must start 16-byte aligned with strides that are multiples of "
              "8 elements on the CUDA kernels, got strides ", k_cache.strides(), " and ", v_cache.strides());
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fusedattn (cuda): window sizes must be >= 0 or -1 "
              "(unbounded), got (", window_left, ", ", window_right, ")");
  TORCH_CHECK(std::isfinite(scale), "fusedattn (cuda): scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "fusedattn (cuda): softcap must be >= 0, got ", softcap);
  TORCH_CHECK(num_splits >= 0 && num_splits <= MAX_SPLITS, "fusedattn (cuda): num_splits must be in [0, ",
              MAX_SPLITS, "] (0 = heuristic), got ", num_splits);
  TORCH_CHECK(B <= MAX_GRID_YZ && Hkv <= MAX_GRID_YZ, "fusedattn (cuda): batch (", B, ") and kv heads (", Hkv,
              ") must each be at most ", MAX_GRID_YZ);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
              "fusedattn (cuda): cache_seqlens must be int32 of shape (B,) = (", B, ",), got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "fusedattn (cuda): k_new and v_new must be given together");
  const int64_t Lnew = k_new.has_value() ? k_new->size(1) : 0;
  if (k_new.has_value()) {
    for (const auto& [t, name] : {std::pair{&*k_new, "k_new"}, {&*v_new, "v_new"}}) {
      check_cuda(*t, name, dev);
      TORCH_CHECK(t->scalar_type() == q_in.scalar_type(), "fusedattn (cuda): ", name, " must have q's dtype ",
                  q_in.scalar_type(), ", got ", t->scalar_type());
      TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == Lnew && t->size(2) == Hkv && t->size(3) == D,
                  "fusedattn (cuda): ", name, " must have shape (B, Lnew, Hkv, D) = (", B, ", ", Lnew, ", ", Hkv,
                  ", ", D, "), got ", t->sizes());
    }
  }
  const bool paged = block_table.has_value();
  int64_t capacity = k_cache.size(1), page_size = 0, max_blocks = 0;
  at::Tensor bt;
  if (paged) {
    check_cuda(*block_table, "block_table", dev);
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 && block_table->size(0) == B,
                "fusedattn (cuda): block_table must be int32 of shape (B, max_blocks) with B = ", B, ", got ",
                block_table->scalar_type(), " ", block_table->sizes());
    TORCH_CHECK(!cache_batch_idx.has_value(), "fusedattn (cuda): cache_batch_idx cannot be combined with "
                "block_table (a paged cache addresses sequences through the block table)");
    page_size = k_cache.size(1);
    TORCH_CHECK(page_size > 0, "fusedattn (cuda): a paged k_cache must have PAGE_SIZE > 0, got ", k_cache.sizes());
    max_blocks = block_table->size(1);
    capacity = max_blocks * page_size;
    bt = block_table->contiguous();
  } else {
    TORCH_CHECK(cache_batch_idx.has_value() || k_cache.size(0) >= B, "fusedattn (cuda): k_cache holds ",
                k_cache.size(0), " sequences but q has batch ", B, " (pass cache_batch_idx to pick cache rows)");
  }
  TORCH_CHECK(capacity < (int64_t(1) << 31), "fusedattn (cuda): the cache holds ", capacity,
              " positions per sequence; the CUDA decode kernel indexes them with 32 bits (< 2^31)");
  at::Tensor cbi;
  if (cache_batch_idx.has_value()) {
    check_cuda(*cache_batch_idx, "cache_batch_idx", dev);
    TORCH_CHECK(cache_batch_idx->scalar_type() == at::kInt && cache_batch_idx->dim() == 1 &&
                cache_batch_idx->size(0) == B, "fusedattn (cuda): cache_batch_idx must be int32 of shape (B,) = (",
                B, ",), got ", cache_batch_idx->scalar_type(), " ", cache_batch_idx->sizes());
    cbi = cache_batch_idx->contiguous();
  }
  dispatch_dtype_hdim(q_in.scalar_type(), D, "decode_fwd", [](auto, auto) {});

  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({B, Lq, Hq, D}, q_in.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q_in.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};
  const at::Tensor q = tileable(q_in), seqlens = cache_seqlens.contiguous();
  const at::Tensor kn = k_new.has_value() ? *k_new : at::Tensor(), vn = v_new.has_value() ? *v_new : at::Tensor();

  // Splits (num_splits = 0): enough CTAs for two waves over the SMs, each split keeping MIN_KEYS_PER_SPLIT
  // keys of the longest possible sequence (the lengths themselves live on the device; reading them would sync).
  const int64_t row_chunks = (Lq * (Hq / Hkv) + DECODE_ROWS_PER_CTA - 1) / DECODE_ROWS_PER_CTA;
  int64_t max_keys = capacity;
  if (window_left >= 0) max_keys = std::min(max_keys, window_left + Lq + std::max<int64_t>(window_right, 0));
  int64_t S = num_splits;
  if (S == 0) {
    int sms = 0;
    check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()), "decode_fwd (SM count)");
    const int64_t ctas = B * Hkv * row_chunks;
    S = std::clamp<int64_t>((2 * sms + ctas - 1) / ctas, 1, std::max<int64_t>(1, max_keys / MIN_KEYS_PER_SPLIT));
    S = std::min<int64_t>(S, 128);
  }
  TORCH_CHECK(S * row_chunks < (int64_t(1) << 31), "fusedattn (cuda): too many query rows per kv head (",
              Lq * (Hq / Hkv), ") for the decode grid");
  at::Tensor out_partial = at::empty({S, B, Lq, Hq, D}, q_in.options().dtype(at::kFloat));
  at::Tensor lse_partial = at::empty({S, B, Hq, Lq}, q_in.options().dtype(at::kFloat));

  DecodeParams p{};
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.D = D;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  for (int d = 0; d < 4; ++d) {
    p.q_stride[d] = q.stride(d);
    p.k_stride[d] = k_cache.stride(d);
    p.v_stride[d] = v_cache.stride(d);
  }
  p.cache_rows = k_cache.size(0);
  p.capacity = capacity;
  p.cache_seqlens = seqlens.data_ptr<int32_t>();
  p.cache_batch_idx = cbi.defined() ? cbi.data_ptr<int32_t>() : nullptr;
  p.block_table = paged ? bt.data_ptr<int32_t>() : nullptr;
  p.max_blocks = max_blocks;
  p.page_size = page_size;
  if (kn.defined()) {
    p.k_new = kn.data_ptr();
    p.v_new = vn.data_ptr();
    for (int d = 0; d < 4; ++d) {
      p.kn_stride[d] = kn.stride(d);
      p.vn_stride[d] = vn.stride(d);
    }
  }
  p.Lnew = Lnew;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = normalize_window(window_left, capacity + Lq);
  p.window_right = normalize_window(window_right, capacity + Lq);
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
  TORCH_CHECK(out_a.is_cuda(), "fusedattn (cuda): out_a must be a CUDA tensor, got ", out_a.device());
  for (const auto& [t, name] : {std::pair{&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}})
    check_cuda(*t, name, out_a.device());
  TORCH_CHECK(out_a.dim() == 4, "fusedattn (cuda): out_a must be 4-D (B, L, H, D), got shape ", out_a.sizes());
  TORCH_CHECK(out_b.sizes() == out_a.sizes() && out_b.scalar_type() == out_a.scalar_type(),
              "fusedattn (cuda): out_b must match out_a's shape and dtype, got ", out_b.scalar_type(), " ",
              out_b.sizes(), " vs ", out_a.scalar_type(), " ", out_a.sizes());
  const at::ScalarType st = out_a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "fusedattn (cuda): out_a must be float32, bfloat16 or float16, got ", st);
  const int64_t B = out_a.size(0), L = out_a.size(1), H = out_a.size(2), D = out_a.size(3);
  const std::vector<int64_t> lse_shape{B, H, L};
  for (const auto& [t, name] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == lse_shape, "fusedattn (cuda): ", name,
                " must be a float32 tensor of shape (B, H, L) = ", lse_shape, ", got ", t->scalar_type(), " ",
                t->sizes());
  const c10::cuda::CUDAGuard guard(out_a.device());
  at::Tensor out = at::empty({B, L, H, D}, out_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, H, L}, lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const at::Tensor a = out_a.stride(3) == 1 ? out_a : out_a.contiguous();
  const at::Tensor b = out_b.stride(3) == 1 ? out_b : out_b.contiguous();
  MergeParams p{};
  p.B = B; p.L = L; p.H = H; p.D = D;
  p.out_a = a.data_ptr();
  p.out_b = b.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  for (int d = 0; d < 3; ++d) {
    p.oa_stride[d] = a.stride(d);
    p.ob_stride[d] = b.stride(d);
    p.la_stride[d] = lse_a.stride(d);
    p.lb_stride[d] = lse_b.stride(d);
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (st == at::kFloat) err = merge_attention_states_launch<float>(p, stream);
  else if (st == at::kHalf) err = merge_attention_states_launch<__half>(p, stream);
  else err = merge_attention_states_launch<__nv_bfloat16>(p, stream);
  check_launch(err, "merge_attention_states");
  return {out, lse};
}

TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("decode_fwd", &decode_fwd_cuda);
  m.impl("merge_attention_states", &merge_attention_states_cuda);
}

}  // namespace fusedattn::cuda
