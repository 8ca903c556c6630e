#!/usr/bin/env bash
# CI's GPU-readiness step, on a machine without a GPU. For the GPU machine's stack (Python 3.12, torch 2.11.0 =
# CUDA 13.0 on the index, triton 3.6):
#   1. builds the CUDA wheel with tools/build_wheels.sh (sm_80 + sm_90a; a compile error in csrc/cuda fails here),
#      in a venv kept between runs (~/.cache/fusedattn; a new machine downloads about 5 GB once);
#   2. installs it into that venv and, from outside the source tree, imports it and checks that `info` reports the
#      CUDA kernels for both archs;
#   3. compiles every Triton kernel of this checkout for sm_90 and sm_80 with that venv's triton
#      (tools/triton_compile_check.py);
#   4. runs benchmarks/gpu_session.sh in dry-run mode with the wheel, so the GPU session script cannot rot.
# Usage: tools/cuda_wheel_ci.sh [WORK_DIR]   (default: a temp dir; the wheel is kept in ~/.cache/fusedattn/wheels)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY_VERSION=${PY_VERSION:-3.12}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
VENV_ROOT=${FUSEDATTN_VENV_ROOT:-$HOME/.cache/fusedattn}
VENV="$VENV_ROOT/venv-cp${PY_VERSION//./}-torch$TORCH_VERSION"
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/fusedattn_cuda_ci.XXXXXX")}
mkdir -p "$WORK" "$VENV_ROOT/wheels"
t0=$(date +%s)
stamp() { echo "== [cuda wheel step, $(( $(date +%s) - t0 )) s] $*"; }

stamp "build the cp${PY_VERSION//./} torch $TORCH_VERSION CUDA wheel for $TORCH_CUDA_ARCH_LIST"
rm -f "$VENV_ROOT"/wheels/fusedattn-*.whl
bash "$ROOT/tools/build_wheels.sh" --python "$PY_VERSION" --torch "$TORCH_VERSION" --out "$VENV_ROOT/wheels"
wheel=$(ls -t "$VENV_ROOT"/wheels/fusedattn-*.whl | head -1)
VPY="$VENV/bin/python"

stamp "install $(basename "$wheel") into $VENV, import it from outside the source tree"
"$VPY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel"
(cd "$WORK" && env -u PYTHONPATH "$VPY" -m fusedattn info && env -u PYTHONPATH "$VPY" - "$TORCH_CUDA_ARCH_LIST" <<'EOF'
import sys
import fusedattn, fusedattn._ops as ops
info = ops.build_info()
assert "site-packages" in fusedattn.__file__, f"imported {fusedattn.__file__}, not the installed wheel"
archs = info.get("cuda_archs", "")
want = [a.replace(".", "") for a in sys.argv[1].replace(" ", ";").split(";") if a]
missing = [a for a in want if not any(x.split("-")[0] == a for x in archs.split(","))]
if not info.get("cuda") or missing:
    sys.exit(f"the wheel's CUDA kernels: cuda={info.get('cuda')} archs={archs!r} (want {want}): "
             f"{info.get('cuda_reason')}")
print(f"ok: CUDA kernels for {archs}")
EOF
)

stamp "compile every Triton kernel for sm_90 and sm_80 with triton $("$VPY" -c 'import triton; print(triton.__version__)')"
# The cache is keyed on each kernel's source and triton's version: unchanged kernels compile once per machine.
"$VPY" "$ROOT/tools/triton_compile_check.py" --arch 90 80 --jobs "${MAX_JOBS:-2}" \
  --cache-dir "$VENV_ROOT/triton-compile-cache"

stamp "benchmarks/gpu_session.sh --dry-run with the wheel"
PATH="$VENV/bin:$PATH" bash "$ROOT/benchmarks/gpu_session.sh" --dry-run --wheel "$wheel" "$WORK/gpu_session"
stamp "done"
