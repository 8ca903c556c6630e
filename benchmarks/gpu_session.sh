#!/usr/bin/env bash
# One GPU session, end to end, on a fresh machine with a CUDA build of torch (>= 2.5), cmake,
# ninja and pybind11 (no network needed):
#   bash benchmarks/gpu_session.sh OUT_DIR
# builds fusedattn, runs the tests (GPU cases included), compute-sanitizer on a small case, the
# full benchmark, and copies everything into OUT_DIR (aim: < 9 minutes on an H100).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
step() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "build"
python -m pip install --no-deps --no-build-isolation -e . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python -m fusedattn info | tee "$out/info.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

step "tests"
timeout 240 python -m pytest tests -q -x 2>&1 | tee "$out/tests.log" | tail -15

step "compute-sanitizer (memcheck) on a small case"
cat > /tmp/fusedattn_small_case.py <<'PY'
import torch, fusedattn
dev = "cuda"
q, k, v = (torch.randn(1, 4, 97, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
out = fusedattn.attention(q, k, v, causal=True)
out.sum().backward()
torch.cuda.synchronize()
print("ok", out.float().abs().sum().item())
PY
if command -v compute-sanitizer > /dev/null; then
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python /tmp/fusedattn_small_case.py \
    > "$out/memcheck.log" 2>&1; echo "memcheck exit code $?" | tee -a "$out/memcheck.log"
else
  echo "compute-sanitizer not found" | tee "$out/memcheck.log"
fi

step "benchmark"
timeout 300 python -m fusedattn bench all --device cuda --out "$out" 2>&1 | tee "$out/bench.log" | tail -40
step "done; results in $out"
ls -la "$out"
