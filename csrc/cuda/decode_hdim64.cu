// Decode instantiations for head dim 64 (one head dim per file: the build compiles them in parallel).
#include "cuda/decode.cuh"

namespace fusedattn::cuda {
template cudaError_t decode_append_launch<__half, 64>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_append_launch<__nv_bfloat16, 64>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_fwd_launch<__half, 64>(const DecodeParams&, cudaStream_t);
template cudaError_t decode_fwd_launch<__nv_bfloat16, 64>(const DecodeParams&, cudaStream_t);
}  // namespace fusedattn::cuda
