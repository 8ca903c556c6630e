// Decode instantiations for head dim 128 (one head dim per file: the build compiles them in parallel).
#include "cuda/decode.cuh"

namespace fusedattn::cuda {
template cudaError_t decode_append_launch<__half, 128>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_append_launch<__nv_bfloat16, 128>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_fwd_launch<__half, 128>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_fwd_launch<__nv_bfloat16, 128>(const DecodeParams&, cudaStream_t);
}  // namespace fusedattn::cuda
