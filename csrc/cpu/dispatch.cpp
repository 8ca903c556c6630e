// Picks the per-ISA build of the CPU kernels at run time. at::get_cpu_capability() is the same
// probe ATen uses for its own kernels, so ATEN_CPU_CAPABILITY=avx2 (or default) forces a lower
// ISA for testing on an AVX-512 machine.
//
// The bf16 attention forward has one more build, AVX512_BF16 (attention_kernel.cpp compiled with
// -mavx512bf16 -mamx-tile -mamx-bf16), chosen from cpuid when the AVX512 build is selected:
//   amx          AMX tiles (tdpbf16ps), when the CPU has amx_bf16 and Linux grants the process the
//                AMX register state (arch_prctl ARCH_REQ_XCOMP_PERM), for D % 32 == 0, Dv % 16 == 0;
//   avx512_bf16  vdpbf16ps dot products (any head dims), when the CPU has avx512_bf16.
// FUSEDATTN_CPU_BF16 (read at every call, so that one process can compare the paths): auto (the
// default: amx where it applies, else the widening kernel; vdpbf16ps measured slower than widening
// to fp32 on the one machine tried, see benchmarks/results/README.md), amx, avx512_bf16, or off.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>
#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

namespace {
enum class Bf16Path { kWiden, kPairDot, kAmx };

struct Bf16Hw {
  const char* dot_missing = nullptr;  // why vdpbf16ps cannot be used, nullptr when it can
  const char* amx_missing = nullptr;  // why AMX cannot be used
};

Bf16Hw probe_bf16_hw() {
  Bf16Hw hw;
#if defined(FUSEDATTN_HAS_AVX512_BF16) && defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
  if (isa() != Isa::kAvx512) {
    hw.dot_missing = hw.amx_missing = "the AVX512 build is not selected";
    return hw;
  }
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) hw.dot_missing = "this CPU has no avx512_bf16";
#if defined(FUSEDATTN_HAS_AMX)
  a = b = c = d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) {
    hw.amx_missing = "this CPU has no amx_bf16";
  } else {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
      hw.amx_missing = "Linux refused the AMX register state (arch_prctl ARCH_REQ_XCOMP_PERM)";
  }
#else
  hw.amx_missing = "not built (the compiler has no -mamx-bf16)";
#endif
#else
  hw.dot_missing = hw.amx_missing =
      "not built (needs an x86-64 Linux build with -mavx512bf16; CMake option FUSEDATTN_BF16_DOT)";
#endif
  return hw;
}

const Bf16Hw& bf16_hw() {
  static const Bf16Hw hw = probe_bf16_hw();
  return hw;
}

// FUSEDATTN_CPU_BF16 as it is now: "auto", "amx", "avx512_bf16" or "off".
const char* bf16_request() {
  const char* env = std::getenv("FUSEDATTN_CPU_BF16");
  if (!env || !*env) return "auto";
  for (const char* ok : {"auto", "amx", "avx512_bf16", "off"})
    if (std::strcmp(env, ok) == 0) return ok;
  TORCH_CHECK(false, "fusedattn (cpu): the environment variable FUSEDATTN_CPU_BF16 must be auto, amx, avx512_bf16 or "
              "off, got '", env, "' (unset it for the default, auto)");
}

// The path for a bf16 forward with head dims D, Dv (D = Dv = 32: the shape-free answer for `info`),
// and in *why the reason a faster one is not taken.
Bf16Path bf16_path(int64_t D, int64_t Dv, std::string* why = nullptr) {
  const std::string req = bf16_request();
  const Bf16Hw& hw = bf16_hw();
  auto no = [&](const std::string& w) {
    if (why) *why = w;
    return Bf16Path::kWiden;
  };
  if (req == "off") return no("turned off by FUSEDATTN_CPU_BF16=off");
  if (req == "avx512_bf16") {
    if (hw.dot_missing) return no(std::string("vdpbf16ps: ") + hw.dot_missing);
    return Bf16Path::kPairDot;
  }
  if (hw.amx_missing) return no(std::string("AMX: ") + hw.amx_missing);
  if (D % 32 != 0 || Dv % 16 != 0) return no("AMX: needs head dims D % 32 == 0 and Dv % 16 == 0");
  return Bf16Path::kAmx;
}
}  // namespace

std::string bf16_forward_path() {
  std::string why;
  switch (bf16_path(32, 32, &why)) {
    case Bf16Path::kAmx: return "AMX tiles (tdpbf16ps) for D % 32 == 0 and Dv % 16 == 0, else " +
                                std::string(selected_isa()) + " (bf16 widened to fp32)";
    case Bf16Path::kPairDot: return "AVX512_BF16 (vdpbf16ps dot products)";
    default: return std::string(selected_isa()) + " (bf16 widened to fp32; " + why + ")";
  }
}

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

void attention_fwd_dispatch(const AttnFwdParams& p) {
#if defined(FUSEDATTN_HAS_AVX512_BF16)
  if (p.dtype == InDtype::kBFloat16) {
    switch (bf16_path(p.D, p.Dv)) {
#if defined(FUSEDATTN_HAS_AMX)
      case Bf16Path::kAmx: return AVX512_BF16::attention_fwd_amx_kernel(p);
#endif
      case Bf16Path::kPairDot: return AVX512_BF16::attention_fwd_kernel(p);
      default: break;
    }
  }
#endif
  FUSEDATTN_ISA_CALL(attention_fwd_kernel)
}
void attention_bwd_dispatch(const AttnBwdParams& p) { FUSEDATTN_ISA_CALL(attention_bwd_kernel) }
void decode_fwd_dispatch(const DecodeParams& p) { FUSEDATTN_ISA_CALL(decode_fwd_kernel) }
void merge_attention_states_dispatch(const MergeParams& p) { FUSEDATTN_ISA_CALL(merge_attention_states_kernel) }

}  // namespace fusedattn::cpu
