// Picks the per-ISA build of the CPU kernels at run time. at::get_cpu_capability() is the same
// probe ATen uses for its own kernels, so ATEN_CPU_CAPABILITY=avx2 (or default) forces a lower
// ISA for testing on an AVX-512 machine.
#include <ATen/Version.h>

#include <string>

#include "cpu/attention.h"

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

void attention_fwd_dispatch(const AttnFwdParams& p) {
  switch (isa()) {
#if defined(FUSEDATTN_HAS_AVX512)
    case Isa::kAvx512: return AVX512::attention_fwd_kernel(p);
#endif
#if defined(FUSEDATTN_HAS_AVX2)
    case Isa::kAvx2: return AVX2::attention_fwd_kernel(p);
#endif
    default: return DEFAULT::attention_fwd_kernel(p);
  }
}

void attention_bwd_dispatch(const AttnBwdParams& p) {
  switch (isa()) {
#if defined(FUSEDATTN_HAS_AVX512)
    case Isa::kAvx512: return AVX512::attention_bwd_kernel(p);
#endif
#if defined(FUSEDATTN_HAS_AVX2)
    case Isa::kAvx2: return AVX2::attention_bwd_kernel(p);
#endif
    default: return DEFAULT::attention_bwd_kernel(p);
  }
}

}  // namespace fusedattn::cpu
