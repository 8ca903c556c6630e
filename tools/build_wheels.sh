#!/usr/bin/env bash
# Builds a fusedattn wheel for the torch installed in this Python, into dist/ (or --out DIR).
#
#   tools/build_wheels.sh                 # CPU torch  -> dist/fusedattn-0.1.0+torch2.13cpu-cp311-cp311-linux_x86_64.whl
#   tools/build_wheels.sh --out /tmp/w    # CUDA torch -> ...+torch2.11cu130-...whl, CUDA kernels for
#                                         #               TORCH_CUDA_ARCH_LIST (default "8.0;8.6;8.9;9.0")
#
# The compiled extension works only with the torch major.minor (and CUDA major.minor) it was built against:
# the wheel names them in its local version tag (setup.py, as flash-attn does), and `import fusedattn` refuses
# another torch with a message that says what to install. So one wheel per (python, torch, CUDA): run this
# script once per environment, e.g. one venv per torch/CUDA pair.
#
# Environment: PYTHON (default python), MAX_JOBS (default: CPU count), TORCH_CUDA_ARCH_LIST,
# FUSEDATTN_LOCAL_VERSION (override the local tag; "" for none).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=dist
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build_wheels.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

read -r TORCH_VERSION TORCH_CUDA < <("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")')
if [ "$TORCH_CUDA" != none ]; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;8.6;8.9;9.0"}
  if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    echo "build_wheels.sh: warning: torch $TORCH_VERSION has CUDA $TORCH_CUDA but nvcc was not found" \
         "(set CUDA_HOME): the wheel will hold the CPU kernels only" >&2
  fi
  echo "== building the CUDA wheel: torch $TORCH_VERSION, CUDA $TORCH_CUDA, archs $TORCH_CUDA_ARCH_LIST"
else
  echo "== building the CPU wheel: torch $TORCH_VERSION"
fi

mkdir -p "$OUT"
# The setuptools build dir keeps one CMake tree per torch build (build/temp*/cmake-<tag>): rebuilding a wheel for
# the same torch is incremental. build/lib* is cleared so that no file of another build lands in the wheel.
rm -rf build/lib.* build/bdist.*
# --no-build-isolation: compile against the torch installed here (an isolated build would fetch another one).
"$PYTHON" -m pip wheel . --no-build-isolation --no-deps -w "$OUT" -q
wheel=$(ls -t "$OUT"/fusedattn-*.whl | head -1)

# The wheel must carry the binary and the record of the torch it was built for.
"$PYTHON" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
so = [n for n in names if n.startswith("fusedattn/_C") and n.endswith(".so")]
missing = [what for what, ok in (("fusedattn/_C*.so", so), ("fusedattn/_build_torch.py",
                                 "fusedattn/_build_torch.py" in names)) if not ok]
if missing:
    sys.exit(f"build_wheels.sh: {sys.argv[1]} lacks {', '.join(missing)}")
for pkg in ("fusedattn/api.py", "fusedattn/kernels/__init__.py", "fusedattn/transformer/__init__.py"):
    if pkg not in names:
        sys.exit(f"build_wheels.sh: {sys.argv[1]} lacks {pkg}")
EOF
echo "== wheel: $wheel ($(du -h "$wheel" | cut -f1))"
