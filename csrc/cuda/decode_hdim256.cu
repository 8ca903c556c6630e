// Decode instantiations for head dim 256 (one head dim per file: the build compiles them in parallel).
#include "cuda/decode.cuh"

namespace fusedattn::cuda {
template cudaError_t decode_append_launch<__half, 256>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_append_launch<__nv_bfloat16, 256>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_fwd_launch<__half, 256>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_fwd_launch<__nv_bfloat16, 256>(const DecodeParams&, cudaStream_t);
}  // namespace fusedattn::cuda
