// Backward instantiations for head dim 128 (one head dim per file: the build compiles them in parallel).
#include "cuda/flash_bwd.cuh"

namespace fusedattn::cuda {
template cudaError_t attention_bwd_launch<__half, 128>(const AttnBwdParams&, cudaStream_t);
template cudaError_t attention_bwd_launch<__nv_bfloat16, 128>(const AttnBwdParams&, cudaStream_t);
}  // namespace fusedattn::cuda
