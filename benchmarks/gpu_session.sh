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

step "CUDA kernel tests (tests/test_cuda.py)"
timeout 300 python -m pytest tests/test_cuda.py -q -x 2>&1 | tee "$out/tests_cuda.log" | tail -15

step "tests"
timeout 240 python -m pytest tests -q -x --ignore=tests/test_cuda.py 2>&1 | tee "$out/tests.log" | tail -15

step "compute-sanitizer (memcheck, racecheck) on small cases"
# Small odd-length cases through every CUDA kernel: forward, backward (dK/dV and dQ kernels; D = 256 runs the
# two-pass dK/dV), paged decode with an in-place append and split-KV combine, merge_attention_states.
cat > /tmp/fusedattn_small_case.py <<'PY'
import math, torch, fusedattn
ops = torch.ops.fusedattn
dev, dt = "cuda", torch.bfloat16
for D, (Lq, Lk), (Hq, Hkv) in [(64, (97, 130), (4, 2)), (128, (33, 17), (2, 2)), (256, (70, 70), (2, 1))]:
    q = torch.randn(1, Hq, Lq, D, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, Hkv, Lk, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    out, lse = ops.attention_fwd(q, k, v, None, D ** -0.5, -1, 0, True, 0.0)
    (out.float().sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
B, Hkv, page, D = 3, 2, 16, 128
lens = torch.tensor([0, 20, 75], dtype=torch.int32, device=dev)
k_cache, v_cache = (torch.randn(20, page, Hkv, D, device=dev, dtype=dt) for _ in range(2))
block_table = torch.randperm(20, device=dev, dtype=torch.int32)[:18].view(B, 6)
q = torch.randn(B, 2, 8, D, device=dev, dtype=dt)
k_new, v_new = (torch.randn(B, 2, Hkv, D, device=dev, dtype=dt) for _ in range(2))
out, lse = ops.decode_fwd(q, k_cache, v_cache, lens, k_new, v_new, block_table, None, D ** -0.5, -1, 0, 0.0, 3)
ops.merge_attention_states(out, lse, out, lse)
torch.cuda.synchronize()
print("ok", out.float().abs().sum().item())
PY
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 python /tmp/fusedattn_small_case.py \
      > "$out/$tool.log" 2>&1; echo "$tool exit code $?" | tee -a "$out/$tool.log"
  done
else
  echo "compute-sanitizer not found" | tee "$out/memcheck.log"
fi

step "benchmark"
timeout 300 python -m fusedattn bench all --device cuda --out "$out" 2>&1 | tee "$out/bench.log" | tail -40
step "done; results in $out"
ls -la "$out"
