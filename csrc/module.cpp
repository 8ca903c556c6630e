// fusedattn._C: importing it registers the ops (static TORCH_LIBRARY initializers in this
// shared object) and exposes what this binary was built with, for `python -m fusedattn info`.
#include <pybind11/pybind11.h>

#include "cpu/attention.h"
#include "op_limits.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedattn compiled kernels; the ops live in torch.ops.fusedattn";
  m.def(
      "build_info",
      [] {
        py::dict d;
        d["torch_version"] = FUSEDATTN_TORCH_VERSION;   // torch the binary was built against
        d["cpu_isas"] = FUSEDATTN_CPU_ISAS;             // kernel builds inside this binary
        d["cpu_isa_selected"] = fusedattn::cpu::selected_isa();
        d["cpu_bf16_forward"] = fusedattn::cpu::bf16_forward_path();  // what serves the bf16 forward
        d["cuda"] = static_cast<bool>(FUSEDATTN_WITH_CUDA);  // CUDA kernels (csrc/cuda) compiled in
        d["cuda_archs"] = FUSEDATTN_CUDA_ARCHS;              // e.g. "80-real,90a-real"; "" without CUDA
        d["cuda_reason"] = FUSEDATTN_CUDA_REASON;            // why not, or what they were built for
        d["compiler"] = __VERSION__;
        d["sanitized"] = static_cast<bool>(FUSEDATTN_SANITIZED);
        d["max_splits"] = fusedattn::MAX_SPLITS;  // decode_fwd's bound on num_splits (csrc/op_limits.h)
        return d;
      },
      "What this binary was compiled with and which CPU kernel build it uses here.");
}
