// merge_attention_states on the GPU: one warp per (b, l, h) row, fp32 arithmetic, any input dtype.
#include "cuda/decode.cuh"  // load_in / store_out

namespace fusedattn::cuda {

template <typename T> __global__ void merge_attention_states_kernel(const MergeParams p) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;  // over (B, L, H)
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.L * p.H) return;
  const int64_t h = row % p.H, l = (row / p.H) % p.L, b = row / (p.H * p.L);
  const float la = p.lse_a[b * p.la_stride[0] + h * p.la_stride[1] + l * p.la_stride[2]];
  const float lb = p.lse_b[b * p.lb_stride[0] + h * p.lb_stride[1] + l * p.lb_stride[2]];
  const float M = fmaxf(la, lb), m_use = M == -INFINITY ? 0.f : M;
  const float wa = expf(la - m_use), wb = expf(lb - m_use), wsum = wa + wb;
  const T* oa = static_cast<const T*>(p.out_a) + b * p.oa_stride[0] + l * p.oa_stride[1] + h * p.oa_stride[2];
  const T* ob = static_cast<const T*>(p.out_b) + b * p.ob_stride[0] + l * p.ob_stride[1] + h * p.ob_stride[2];
  T* out = static_cast<T*>(p.out) + row * p.D;
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  for (int64_t d = lane; d < p.D; d += 32) {
    // A side with weight 0 is never read: its output may be garbage (or NaN) when its lse is -inf.
    float x = 0.f;
    if (wa > 0.f) x += wa * load_in(oa + d);
    if (wb > 0.f) x += wb * load_in(ob + d);
    store_out(out + d, x * inv);
  }
  if (lane == 0) p.lse[(b * p.H + h) * p.L + l] = wsum > 0.f ? m_use + logf(wsum) : -INFINITY;
}

template <typename T> cudaError_t merge_attention_states_launch(const MergeParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.L * p.H;
  if (rows == 0) return cudaSuccess;
  merge_attention_states_kernel<T><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t merge_attention_states_launch<float>(const MergeParams&, cudaStream_t);
template cudaError_t merge_attention_states_launch<__half>(const MergeParams&, cudaStream_t);
template cudaError_t merge_attention_states_launch<__nv_bfloat16>(const MergeParams&, cudaStream_t);

}  // namespace fusedattn::cuda
