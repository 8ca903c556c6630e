// Forward instantiations for head dim 64 (one head dim per file: the build compiles them in parallel).
#include "cuda/flash_fwd.cuh"

namespace fusedattn::cuda {
template cudaError_t attention_fwd_launch<__half, 64>(const AttnFwdParams&, cudaStream_t);
template cudaError_t attention_fwd_launch<__nv_bfloat16, 64>(const AttnFwdParams&, cudaStream_t);
}  // namespace fusedattn::cuda
