// Picks the per-ISA build of the CPU kernels at run time. at::get_cpu_capability() is the same
// probe ATen uses for its own kernels, so ATEN_CPU_CAPABILITY=avx2 (or default) forces a lower
// ISA for testing on an AVX-512 machine.
#include <ATen/Version.h>

#include <string>

#include "cpu/attention.h"
#include "cpu/decode.h"

namespace fusedattn::cpu {

namespace {
enum class Isa { kDefault, kAvx2, kAvx512 };

Isa pick_isa() {
  const std::string cap = at::get_cpu_capability();
#if defined(FUSEDATTN_HAS_AVX512)
  if (cap == "AVX512") return Isa::kAvx512;
#endif
#if defined(FUSEDATTN_HAS_AVX2)
  if (cap == "AVX2" || cap == "AVX512") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}
}  // namespace

const char* selected_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "AVX512";
    case Isa::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

// Calls ISA::fn(p) for the ISA chosen above.
#if defined(FUSEDATTN_HAS_AVX512)
#define FUSEDATTN_CASE_AVX512(fn) case Isa::kAvx512: return AVX512::fn(p);
#else
#define FUSEDATTN_CASE_AVX512(fn)
#endif
#if defined(FUSEDATTN_HAS_AVX2)
#define FUSEDATTN_CASE_AVX2(fn) case Isa::kAvx2: return AVX2::fn(p);
#else
#define FUSEDATTN_CASE_AVX2(fn)
#endif
#define FUSEDATTN_ISA_CALL(fn)  \
  switch (isa()) {              \
    FUSEDATTN_CASE_AVX512(fn)   \
    FUSEDATTN_CASE_AVX2(fn)     \
    default: return DEFAULT::fn(p); \
  }

void attention_fwd_dispatch(const AttnFwdParams& p) { FUSEDATTN_ISA_CALL(attention_fwd_kernel) }
void attention_bwd_dispatch(const AttnBwdParams& p) { FUSEDATTN_ISA_CALL(attention_bwd_kernel) }
void decode_fwd_dispatch(const DecodeParams& p) { FUSEDATTN_ISA_CALL(decode_fwd_kernel) }
void merge_attention_states_dispatch(const MergeParams& p) { FUSEDATTN_ISA_CALL(merge_attention_states_kernel) }

}  // namespace fusedattn::cpu
