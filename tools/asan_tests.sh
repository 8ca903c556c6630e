#!/usr/bin/env bash
# CI sanitizer step: builds the CPU kernels with -fsanitize=address,undefined (CMake option FUSEDATTN_SANITIZE)
# into a separate tree and runs the CPU test subset against that build; any ASAN or UBSAN report fails it.
#
#   tools/asan_tests.sh                  # the CPU subset, in two passes (below)
#   tools/asan_tests.sh tests/test_x.py  # other tests (pytest arguments), one pass with the machine's ISA
#
# Pass 1 runs tests/test_attention.py, test_bad_inputs.py, test_fuzz.py (ci profile), test_decode.py and
# test_varlen.py with the kernel build this machine selects (AVX2 or AVX512); pass 2 runs the kernel grids
# (test_attention.py, test_decode.py, test_varlen.py) again with ATEN_CPU_CAPABILITY=default, so the portable
# build of the kernels, whose tile sizes differ, is checked too.
#
# Nothing of the main build is touched: the sanitized _C lands in a copy of the package under $ASAN_DIR
# (default /tmp/fusedattn_asan), next to a copy of the tests, and pytest runs there, so `import fusedattn`
# finds the sanitized copy. The CMake tree is kept between runs (incremental rebuilds).
#
# How it runs under python (which is not built with ASAN):
#   LD_PRELOAD   gcc's libasan (and libubsan) come first in the process, as the sanitized _C requires;
#   ASAN_OPTIONS detect_leaks=0 (CPython and torch keep allocations alive at exit by design),
#                halt_on_error=1 (the first report kills the process: a failed run, never a passing one),
#                allocator_may_return_null=1 (the hostile-input tests ask for tens of TiB: that must be a NULL
#                the code turns into an error, not an ASAN abort), verify_asan_link_order=0 (subprocesses the
#                tests start inherit LD_PRELOAD; harmless, but keeps torch's compile workers quiet);
#   UBSAN_OPTIONS print_stacktrace=1:halt_on_error=1.
# The run's output is also searched for reports, in case one came from a child process whose exit status was
# not checked.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
ASAN_DIR=${ASAN_DIR:-/tmp/fusedattn_asan}
BUILD="$ASAN_DIR/build"
TREE="$ASAN_DIR/tree"
LOG="$ASAN_DIR/pytest.log"
JOBS=${MAX_JOBS:-$(nproc)}
t0=$(date +%s)

# ---- a copy of the package and the tests (the sanitized _C goes into it)
rm -rf "$TREE"
# The CMake tree is reused between runs, but only for the same source tree (CMake refuses another one).
if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT" "$BUILD/CMakeCache.txt"; then
  rm -rf "$BUILD"
fi
mkdir -p "$TREE" "$BUILD"
cp -r "$ROOT/fusedattn" "$ROOT/tests" "$ROOT/pyproject.toml" "$TREE/"
cp -r "$ROOT/kernels" "$TREE/fusedattn/kernels"          # installed as fusedattn.kernels (setup.py package_dir)
cp -r "$ROOT/transformer" "$TREE/fusedattn/transformer"  # installed as fusedattn.transformer
rm -f "$TREE"/fusedattn/_C*.so "$TREE/fusedattn/_build_torch.py"
find "$TREE" -name __pycache__ -prune -exec rm -rf {} +

# ---- configure and build (setup.py's CMake arguments, plus FUSEDATTN_SANITIZE=ON)
echo "== ASAN/UBSAN build in $BUILD"
gen=()
if command -v ninja >/dev/null; then gen=(-GNinja); fi
cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -Dpybind11_DIR="$("$PYTHON" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython3_EXECUTABLE="$("$PYTHON" -c 'import sys; print(sys.executable)')" \
  -DFUSEDATTN_OUTPUT_DIR="$TREE/fusedattn" -DFUSEDATTN_SANITIZE=ON > "$ASAN_DIR/cmake.log" 2>&1 \
  || { tail -50 "$ASAN_DIR/cmake.log"; exit 1; }
# (the fresh copy has no _C: ninja / make relink it into the copy even when nothing needs compiling)
cmake --build "$BUILD" -j "$JOBS" >> "$ASAN_DIR/cmake.log" 2>&1 || { tail -50 "$ASAN_DIR/cmake.log"; exit 1; }
"$PYTHON" -c "import torch; print(f'TORCH_VERSION = {torch.__version__!r}\nTORCH_CUDA = {torch.version.cuda!r}')" \
  > "$TREE/fusedattn/_build_torch.py"
t1=$(date +%s)

# ---- run the tests under the sanitizers
LIBASAN=$(g++ -print-file-name=libasan.so)
LIBUBSAN=$(g++ -print-file-name=libubsan.so)
for lib in "$LIBASAN" "$LIBUBSAN"; do
  [ -f "$lib" ] || { echo "asan_tests.sh: $lib not found (gcc's sanitizer runtimes)" >&2; exit 1; }
done
if ! nm -D "$TREE"/fusedattn/_C*.so | grep __asan_init > /dev/null; then
  echo "asan_tests.sh: $TREE/fusedattn/_C*.so is not instrumented (FUSEDATTN_SANITIZE had no effect)" >&2
  exit 1
fi
export LD_PRELOAD="$LIBASAN $LIBUBSAN${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:allocator_may_return_null=1:verify_asan_link_order=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
cd "$TREE"
echo "== the build reports itself as sanitized"
"$PYTHON" -c "import fusedattn, fusedattn._ops as o; b = o.build_info(); print(b); assert b['sanitized'], b"
status=0
run_pass() {  # run_pass LABEL ISA(native|default|avx2|...) PYTEST_ARGS...
  local label=$1 isa=$2
  shift 2
  echo "== pytest under ASAN/UBSAN, $label: $*"
  local rc
  set +e
  if [ "$isa" = native ]; then
    "$PYTHON" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee -a "$LOG"
  else
    ATEN_CPU_CAPABILITY=$isa "$PYTHON" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee -a "$LOG"
  fi
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 0 ] || status=$rc
}
: > "$LOG"
if [ $# -gt 0 ]; then
  run_pass "machine's kernel ISA" native "$@"
else
  decode=()
  [ -f tests/test_decode.py ] && decode=(tests/test_decode.py)
  [ -f tests/test_varlen.py ] && decode+=(tests/test_varlen.py)
  run_pass "pass 1, the machine's kernel ISA" native tests/test_attention.py tests/test_bad_inputs.py \
    tests/test_fuzz.py "${decode[@]}"
  # (-k "not inductor": with ATEN_CPU_CAPABILITY=default, torch's inductor emits at::vec code its own
  # precompiled header does not declare -- a torch limitation, unrelated to our kernels; pass 1 covers inductor)
  run_pass "pass 2, ATEN_CPU_CAPABILITY=default" default -k "not inductor" tests/test_attention.py "${decode[@]}"
fi
t2=$(date +%s)
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOG"; then
  echo "asan_tests.sh: sanitizer report(s) in $LOG:" >&2
  grep -nE -A5 "ERROR: AddressSanitizer|runtime error:|SUMMARY: " "$LOG" | head -60 >&2
  status=1
fi
echo "== sanitizer step: build $((t1 - t0)) s, tests $((t2 - t1)) s, exit $status"
exit "$status"
