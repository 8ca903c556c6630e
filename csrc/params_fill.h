// Filling the kernels' parameter structs from checked tensors, written once for the CPU (csrc/cpu/attention.h,
// decode.h) and CUDA (csrc/cuda/params.h) structs: the fields both have carry the same names, so these templates
// serve either; each binding then sets the fields only its kernels have (CPU: dtype, Dv, the mask; CUDA: the
// windows of dense attention, scratch pointers). Call after the checks of csrc/checks.h.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "checks.h"

namespace fusedattn {

// dst[d] = t.stride(d) for the first N dimensions of t (element strides, as the kernels take them).
template <size_t N>
void copy_strides(int64_t (&dst)[N], const at::Tensor& t) {
  for (size_t d = 0; d < N; ++d) dst[d] = t.stride(static_cast<int64_t>(d));
}

// Sizes, data pointers and element strides of (B, H, L, D) views q, k, v.
template <typename P>
void fill_qkv(P& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Hkv = k.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.D = q.size(3);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides(p.q_stride, q);
  copy_strides(p.k_stride, k);
  copy_strides(p.v_stride, v);
}

// The fields of DecodeCommon (csrc/decode_params.h) but the split count and the outputs. seqlens, block_table
// and cache_batch_idx: contiguous int32 copies of the arguments (undefined when absent).
template <typename P>
void fill_decode(P& p, const DecodeShape& s, const DecodeInputs& in, const at::Tensor& seqlens,
                 const at::Tensor& block_table, const at::Tensor& cache_batch_idx) {
  p.B = s.B;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.Lq = s.Lq;
  p.D = s.D;
  p.Dv = s.Dv;
  p.q = in.q.data_ptr();
  p.k_cache = in.k_cache.data_ptr();
  p.v_cache = in.v_cache.data_ptr();
  copy_strides(p.q_stride, in.q);
  copy_strides(p.k_stride, in.k_cache);
  copy_strides(p.v_stride, in.v_cache);
  p.cache_rows = in.k_cache.size(0);
  p.capacity = s.capacity;
  p.cache_seqlens = seqlens.data_ptr<int32_t>();
  p.cache_batch_idx = cache_batch_idx.defined() ? cache_batch_idx.data_ptr<int32_t>() : nullptr;
  p.block_table = block_table.defined() ? block_table.data_ptr<int32_t>() : nullptr;
  p.max_blocks = s.max_blocks;
  p.page_size = s.page_size;
  if (in.k_new.has_value()) {  // an empty k_new (D == 0) has a null data pointer; the kernels go by Lnew
    p.k_new = in.k_new->data_ptr();
    p.v_new = in.v_new->data_ptr();
    copy_strides(p.kn_stride, *in.k_new);
    copy_strides(p.vn_stride, *in.v_new);
  }
  p.Lnew = s.Lnew;
  p.scale = static_cast<float>(in.scale);
  p.softcap = static_cast<float>(in.softcap);
  p.window_left = s.window_left;
  p.window_right = s.window_right;
}

// merge_attention_states' tensors: the inputs as the kernels read them (whole rows: unit stride along D) and
// the contiguous outputs out (B, L, H, D) and lse (B, H, L). Call after check_merge.
struct MergeTensors {
  at::Tensor a, b, out, lse;
};

inline MergeTensors merge_tensors(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b) {
  const int64_t B = out_a.size(0), L = out_a.size(1), H = out_a.size(2), D = out_a.size(3);
  return {out_a.stride(3) == 1 ? out_a : out_a.contiguous(), out_b.stride(3) == 1 ? out_b : out_b.contiguous(),
          at::empty({B, L, H, D}, out_a.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({B, H, L}, lse_a.options().memory_format(at::MemoryFormat::Contiguous))};
}

template <typename P>
void fill_merge(P& p, const MergeTensors& m, const at::Tensor& lse_a, const at::Tensor& lse_b) {
  p.B = m.a.size(0);
  p.L = m.a.size(1);
  p.H = m.a.size(2);
  p.D = m.a.size(3);
  p.out_a = m.a.data_ptr();
  p.out_b = m.b.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  copy_strides(p.oa_stride, m.a);
  copy_strides(p.ob_stride, m.b);
  copy_strides(p.la_stride, lse_a);
  copy_strides(p.lb_stride, lse_b);
  p.out = m.out.data_ptr();
  p.lse = m.lse.data_ptr<float>();
}

}  // namespace fusedattn
