#!/usr/bin/env bash
# One GPU session in one call of under 8 minutes: installs a prebuilt wheel (no build on the GPU machine) and
# runs every GPU check, each stage under its own time cap; a dry run does the same on a CPU machine (CI).
#
#   bash benchmarks/gpu_session.sh [--dry-run] [--wheel PATH] OUT_DIR
#
# Through the device tool (the wheel lies in the ignored dist/, so it travels with `carry`; build it first on
# a machine with torch 2.11.0+cu130, Python 3.12 and nvcc: tools/build_wheels.sh):
#   run(command="bash benchmarks/gpu_session.sh $OUT", carry=["dist"], timeout_s=540)
#   run(command="bash benchmarks/gpu_session.sh --wheel dist/fusedattn-0.1.0+torch2.11cu130-cp312-cp312-linux_x86_64.whl $OUT", ...)
# CI / a CPU machine (a few minutes on 2 cores):
#   bash benchmarks/gpu_session.sh --dry-run /tmp/gpu_session_dry
#
# --wheel: default the newest dist/fusedattn-*+torch2.11cu130-cp312-*.whl of this checkout. Everything after
# the install runs from a temporary directory outside the source tree, so `import fusedattn` is the installed
# wheel, not the checkout (the info stage says which files differ from the checkout: a wheel built from another
# tree). --dry-run: no install (the fusedattn already installed in this Python), the GPU-only parts are skipped
# and the rest runs on the CPU.
#
# Stages (cap = the stage's `timeout`; a failing stage does not stop the next ones, the exit status is 1 when
# any failed; the table at the end lists stage, status, seconds). Caps sum to 480 s; override with CAP_<STAGE>.
#   install  40 s  pip install --no-deps --force-reinstall WHEEL                        (dry run: skipped)
#   info     30 s  python -m fusedattn info, nvidia-smi, machine JSON, wheel vs checkout
#   grid    160 s  benchmarks/gpu_check.py grid: forward, backward, varlen, decode paged and contiguous, merge;
#                  CUDA and Triton backends; fp16/bf16; D 64/128/256; odd lengths; causal both alignments; GQA;
#                  pairwise per backend, the 2x rule against the float64 reference; no case starts after 140 s
#                  (dry run: the cpu backend and 3 cases per family through Triton's interpreter, small shapes)
#   memcheck 90 s  compute-sanitizer --tool memcheck on gpu_check.py small-case (every CUDA kernel, small odd
#                  shapes)                                   (dry run, or no compute-sanitizer: the case, plain)
#   bench   150 s  python -m fusedattn bench decode attention --bundle bench: decode B=64 Hq=32 Hkv=8 D=128
#                  L=8192 bf16/fp16, contiguous and paged, with a 256 MiB device copy timed beside it (GB/s, % of
#                  copy); attention bf16/fp16 fwd and fwd+bwd, D 64/128, L 1k/4k/16k (B*L = 16k tokens, H*D =
#                  2048), causal and not: fusedattn cuda + triton vs torch SDPA (default, flash, efficient, cuDNN)
#                  and compiled FlexAttention; no case or backend starts after 115 s (the rest listed as
#                  skipped)                                  (dry run: --quick on the CPU)
#   budget   10 s  the output limits: <= 8 files of <= 16 MiB, <= 2 folders below OUT_DIR, plain names
#
# Files in OUT_DIR (8 at most; the budget stage fails otherwise):
#   session.log  this script's whole output (every stage, the summary)
#   grid.json    every grid case: family, backend, case, status pass/fail/error/skip, errors and bounds, seconds
#   memcheck.log compute-sanitizer's report
#   bench.md, bench.json, bench.csv, <device>_attention.png, <device>_decode.png   the benchmark (PNGs need
#                matplotlib)
set -uo pipefail

dry=0 wheel="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --wheel) wheel=${2:?--wheel needs a path}; shift 2 ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    -*) echo "gpu_session.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu_session.sh: one OUT_DIR only" >&2; exit 2; }; out=$1; shift ;;
  esac
done
[ -n "$out" ] || { echo "usage: gpu_session.sh [--dry-run] [--wheel PATH] OUT_DIR" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
PY=${PYTHON:-python}
check="$repo/benchmarks/gpu_check.py"
work=$(mktemp -d "${TMPDIR:-/tmp}/fusedattn_session.XXXXXX")
trap 'rm -rf "$work"' EXIT
exec > >(tee -a "$out/session.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
cd "$work"  # outside the source tree: the installed fusedattn is imported

gpu=0
if [ $dry = 0 ]; then
  gpu=1
  if [ -z "$wheel" ]; then
    wheel=$(ls -t "$repo"/dist/fusedattn-*+torch2.11cu130-cp312-*.whl 2>/dev/null | head -1)
  fi
  case "$wheel" in /*|"") ;; *) wheel="$repo/$wheel" ;; esac  # relative to the checkout
  unset TRITON_INTERPRET
fi

t0=$(date +%s)
names=() statuses=() secs=() failed=0
record() {  # name status seconds
  names+=("$1"); statuses+=("$2"); secs+=("$3")
  case "$2" in ok*|skipped*) ;; *) failed=1 ;; esac
}
stage() {  # name cap command...: runs the command under `timeout cap`, records its status
  local name=$1 cap=$2; shift 2
  echo; echo "== [$(( $(date +%s) - t0 )) s] $name (cap ${cap} s)"
  local s; s=$(date +%s)
  timeout --kill-after=5 "$cap" "$@"
  local rc=$? status=ok
  [ $rc = 0 ] || status="FAILED (exit $rc)"
  [ $rc = 124 ] || [ $rc = 137 ] && status="TIMEOUT (${cap} s)"
  record "$name" "$status" $(( $(date +%s) - s ))
}
skip() {  # name why
  echo; echo "== [$(( $(date +%s) - t0 )) s] $1: skipped ($2)"
  record "$1" "skipped ($2)" 0
}

# --- install ------------------------------------------------------------------------------------------------
if [ $gpu = 1 ]; then
  if [ -n "$wheel" ] && [ -f "$wheel" ]; then
    stage install "${CAP_INSTALL:-40}" "$PY" -m pip install --no-deps --force-reinstall -q "$wheel"
  else
    echo "== install: no wheel (looked for ${wheel:-$repo/dist/fusedattn-*+torch2.11cu130-cp312-*.whl});" \
         "build one with tools/build_wheels.sh and pass --wheel, or carry dist/"
    record install "FAILED (no wheel)" 0
  fi
else
  skip install "dry run: $PY's fusedattn"
fi

# --- info ---------------------------------------------------------------------------------------------------
info() {
  "$PY" -m fusedattn info
  "$PY" - "$repo" "$gpu" <<'EOF'
import hashlib, json, os, sys
import torch, fusedattn
from fusedattn.bench.core import machine_info
repo, gpu = sys.argv[1], sys.argv[2] == "1"
print(json.dumps(machine_info("cuda" if gpu else "cpu")))
pkg = os.path.dirname(os.path.abspath(fusedattn.__file__))
print(f"imported fusedattn from {pkg}")
if gpu and pkg.startswith(repo + os.sep):
    print("WARNING: that is the checkout, not an installed wheel")
digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
differ = []
import importlib.util
for src, mod in (("fusedattn", "fusedattn"), ("kernels", "fusedattn.kernels"), ("transformer", "fusedattn.transformer")):
    spec = importlib.util.find_spec(mod)  # (an editable install maps kernels/ and transformer/ elsewhere)
    where = list(spec.submodule_search_locations)[0] if spec else os.path.join(pkg, "missing")
    for d, _, files in os.walk(os.path.join(repo, src)):
        for f in files:
            if f.endswith(".py") and f != "_build_torch.py":
                a = os.path.join(d, f)
                b = os.path.join(where, os.path.relpath(a, os.path.join(repo, src)))
                if not os.path.exists(b) or digest(a) != digest(b):
                    differ.append(os.path.relpath(a, repo))
print("installed Python files match the checkout" if not differ else
      f"WARNING: {len(differ)} Python files of the checkout differ from (or are missing in) the installed "
      f"fusedattn, so the wheel was built from another tree: {', '.join(sorted(differ))}")
EOF
  if [ $gpu = 1 ]; then nvidia-smi || echo "(nvidia-smi failed: exit $?)"; fi
}
export -f info
export PY repo gpu out check
stage info "${CAP_INFO:-30}" bash -c info

# --- grid ---------------------------------------------------------------------------------------------------
if [ $gpu = 1 ]; then
  stage grid "${CAP_GRID:-160}" "$PY" "$check" grid --device cuda --backends cuda,triton \
    --time-cap "${GRID_TIME_CAP:-140}" --out "$out/grid.json"
else
  echo "(dry run: GPU grid skipped (no GPU); the same grid code on the cpu backend, and Triton's interpreter)"
  # Triton's cases run through its interpreter on the CPU
  stage grid "${CAP_GRID:-160}" env TRITON_INTERPRET=1 "$PY" "$check" grid --device cpu --backends cpu,triton \
    --small --max-cases 3 \
    --time-cap "${GRID_TIME_CAP:-140}" --out "$out/grid.json"
fi

# --- memcheck -----------------------------------------------------------------------------------------------
sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
            /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
memcheck() {
  # no caching allocator: memcheck sees each tensor's own bounds instead of the allocator's large blocks
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 9 \
    "$PY" "$check" small-case --device cuda --backend cuda > "$out/memcheck.log" 2>&1
  local rc=$?
  truncate -s '<15M' "$out/memcheck.log"  # within the 16 MiB a returned file may have
  tail -25 "$out/memcheck.log"
  return $rc
}
export -f memcheck
export sanitizer
if [ $gpu = 1 ] && [ -n "$sanitizer" ]; then
  stage memcheck "${CAP_MEMCHECK:-90}" bash -c memcheck
elif [ $gpu = 1 ]; then
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin): the small case without it"
  stage "small case (no sanitizer)" "${CAP_MEMCHECK:-90}" "$PY" "$check" small-case --device cuda --backend cuda
  record memcheck "FAILED (no compute-sanitizer)" 0
else
  echo "(dry run: memcheck skipped (no GPU); the small case on the cpu backend, without the sanitizer)"
  stage "small case (cpu)" "${CAP_MEMCHECK:-90}" "$PY" "$check" small-case --device cpu --backend cpu
fi

# --- bench --------------------------------------------------------------------------------------------------
if [ $gpu = 1 ]; then
  stage bench "${CAP_BENCH:-150}" "$PY" -m fusedattn bench decode attention --device cuda \
    --where decode:B=64 --where decode:L=8192 --where decode:Hkv=8 \
    --where attention:D=64,128 --where attention:L=1024,4096,16384 \
    --time-cap "${BENCH_TIME_CAP:-115}" --out "$out" --bundle bench
else
  echo "(dry run: the benchmark's --quick cases on the CPU)"
  stage bench "${CAP_BENCH:-150}" "$PY" -m fusedattn bench decode attention --device cpu --quick --repeats 2 \
    --where attention:D=64,128 --where attention:L=1024,4096,16384 \
    --time-cap "${BENCH_TIME_CAP:-115}" --out "$out" --bundle bench
fi

# --- budget -------------------------------------------------------------------------------------------------
stage budget "${CAP_BUDGET:-10}" "$PY" "$check" budget "$out" --max-files 8 --max-mib 16 --max-depth 2

echo
echo "== [$(( $(date +%s) - t0 )) s] summary ($([ $dry = 1 ] && echo "dry run" || echo "GPU session"); results in $out)"
printf '%-28s %-44s %8s\n' stage status seconds
for i in "${!names[@]}"; do
  printf '%-28s %-44s %8s\n' "${names[$i]}" "${statuses[$i]}" "${secs[$i]}"
done
printf '%-28s %-44s %8s\n' total "$([ $failed = 0 ] && echo ok || echo FAILED)" $(( $(date +%s) - t0 ))
exec >&- 2>&-  # let tee write the last lines into session.log before the script ends
wait "$tee_pid" 2>/dev/null
exit $failed
