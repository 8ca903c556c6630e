// Limits of the fusedattn ops that the checks (csrc/checks.h), the kernels and the Python side share, each
// written once. Torch-free, so that the per-ISA CPU kernels and nvcc-compiled code can include it too; Python
// reads them from fusedattn._C.build_info() (csrc/module.cpp).
#pragma once

#include <cstdint>

namespace fusedattn {

// The most key-range splits decode_fwd takes (num_splits, and the heuristic's cap). The CPU kernel merges a
// row's partial states with a stack array of this many weights (decode_kernel.cpp, combine_lse).
constexpr int64_t MAX_SPLITS = 1024;

}  // namespace fusedattn
