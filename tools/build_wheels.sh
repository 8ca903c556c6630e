#!/usr/bin/env bash
# Builds a fusedattn wheel, CPU or CUDA, on a machine with or without a GPU.
#
#   tools/build_wheels.sh [--out DIR]
#       a wheel for the torch installed in $PYTHON (default python): CPU torch -> ...+torch2.13cpu-cp311-...whl
#   tools/build_wheels.sh --python 3.12 --torch 2.11.0 [--out DIR]
#       a wheel for that Python and that torch from the package index, built in a venv that this script makes
#       (and keeps, for the next build) under $FUSEDATTN_VENV_ROOT (default ~/.cache/fusedattn):
#       torch 2.11.0 is CUDA 13.0 on the index -> fusedattn-0.1.0+torch2.11cu130-cp312-cp312-linux_x86_64.whl,
#       CUDA kernels for TORCH_CUDA_ARCH_LIST (default "8.0;9.0a": sm_80 for A100, sm_90a for H100/H200)
#
# No GPU is needed: nvcc compiles for the archs listed. What a CUDA build needs besides nvcc is supplied here:
#   * torch's CMake config (Caffe2Config / FindCUDA) wants a complete toolkit: nvrtc, cuBLAS and their headers,
#     libraries in lib64/. A bare nvcc toolkit (nvcc, cudart, no nvrtc/cuBLAS, libraries in lib/) lacks them, but
#     the nvidia-* pip packages that come with a CUDA torch ship them. The script builds a merged CUDA root in
#     the venv (symlinks: the toolkit's bin/include/lib, then the pip packages' headers and libraries, with the
#     unversioned .so names CMake looks for) and points CUDA_HOME at it.
#   * nvcc may be a wrapper script (/usr/local/bin/nvcc); the toolkit is found from `nvcc -dryrun` (its TOP).
# The compiled extension works only with the torch major.minor (and CUDA version) it was built against: the wheel
# names them in its local version tag (setup.py, as flash-attn does), and `import fusedattn` refuses another torch.
#
# Environment: PYTHON (the first form), MAX_JOBS (default: CPU count), TORCH_CUDA_ARCH_LIST, CUDA_HOME (the
# toolkit; default: found from nvcc), FUSEDATTN_VENV_ROOT, FUSEDATTN_LOCAL_VERSION (override the local tag).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python}
OUT=dist
PY_WANT=
TORCH_WANT=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --python) PY_WANT=$2; shift 2 ;;
    --torch) TORCH_WANT=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "build_wheels.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
if { [ -n "$PY_WANT" ] && [ -z "$TORCH_WANT" ]; } || { [ -z "$PY_WANT" ] && [ -n "$TORCH_WANT" ]; }; then
  echo "build_wheels.sh: --python and --torch go together" >&2; exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

find_python() {  # $1 = X.Y -> path of a python X.Y interpreter (PATH, then pyenv)
  local want=$1 cand v
  for cand in "python$want" "python3"; do
    if command -v "$cand" >/dev/null && [ "$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])' \
        2>/dev/null)" = "$want" ]; then command -v "$cand"; return; fi
  done
  if command -v pyenv >/dev/null; then
    v=$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -V | tail -1)
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python$want" ]; then
      echo "$(pyenv root)/versions/$v/bin/python$want"; return
    fi
  fi
  echo "build_wheels.sh: no Python $want found (PATH or pyenv)" >&2; return 1
}

if [ -n "$PY_WANT" ]; then
  VENV_ROOT=${FUSEDATTN_VENV_ROOT:-$HOME/.cache/fusedattn}
  VENV="$VENV_ROOT/venv-cp${PY_WANT//./}-torch$TORCH_WANT"
  if [ ! -x "$VENV/bin/python" ]; then
    BASE_PY=$(find_python "$PY_WANT")
    echo "== new venv $VENV ($BASE_PY)"
    mkdir -p "$VENV_ROOT"
    "$BASE_PY" -m venv "$VENV"
  fi
  PYTHON="$VENV/bin/python"
  have=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
  if [ "$have" != "$TORCH_WANT" ]; then
    # A CUDA torch with its nvidia-* packages is several GB: downloaded once, kept in the venv for later builds.
    echo "== installing torch==$TORCH_WANT into $VENV (a CUDA build downloads several GB once)"
    "$PYTHON" -m pip install -q --disable-pip-version-check "torch==$TORCH_WANT" 'numpy<2.4'
  fi
  "$PYTHON" -m pip install -q --disable-pip-version-check setuptools wheel pybind11 cmake ninja
  export PATH="$VENV/bin:$PATH"  # the venv's cmake and ninja
fi

read -r TORCH_VERSION TORCH_CUDA < <("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")')
CMAKE_ARGS=(-DCMAKE_SKIP_BUILD_RPATH=ON)  # no build-machine paths in the binary: torch loads its libraries first
if [ "$TORCH_CUDA" != none ]; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
  # The toolkit: CUDA_HOME, else the TOP that nvcc reports (nvcc may be a wrapper script on PATH).
  TOOLKIT=${CUDA_HOME:-}
  if [ -z "$TOOLKIT" ] && command -v nvcc >/dev/null; then
    TOOLKIT=$(cd /tmp && nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    TOOLKIT=$(cd "$TOOLKIT" 2>/dev/null && pwd -P || true)
  fi
  [ -n "$TOOLKIT" ] || [ ! -x /usr/local/cuda/bin/nvcc ] || TOOLKIT=/usr/local/cuda
  if [ -z "$TOOLKIT" ] || [ ! -x "$TOOLKIT/bin/nvcc" ]; then
    echo "build_wheels.sh: torch $TORCH_VERSION has CUDA $TORCH_CUDA but no nvcc was found (set CUDA_HOME)" >&2
    exit 1
  fi
  NVCC_CUDA=$("$TOOLKIT/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
  if [ "${NVCC_CUDA%%.*}" != "${TORCH_CUDA%%.*}" ]; then
    echo "build_wheels.sh: nvcc $NVCC_CUDA ($TOOLKIT) cannot build for torch's CUDA $TORCH_CUDA" >&2; exit 1
  fi
  # The merged CUDA root (see the top): the toolkit first, then what the nvidia-* packages of this torch add.
  SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  MERGED=$(dirname "$(dirname "$PYTHON")")/cuda-root
  [ -n "${VENV:-}" ] || MERGED="$ROOT/build/cuda-root-$TORCH_VERSION"
  rm -rf "$MERGED"
  mkdir -p "$MERGED/bin" "$MERGED/include" "$MERGED/lib64"
  link_all() {  # link_all SRC_DIR DST_DIR: symlink each entry of SRC_DIR not yet in DST_DIR
    local f
    [ -d "$1" ] || return 0
    for f in "$1"/*; do [ -e "$f" ] && [ ! -e "$2/$(basename "$f")" ] && ln -s "$f" "$2/"; done; return 0
  }
  link_all "$TOOLKIT/bin" "$MERGED/bin"
  link_all "$TOOLKIT/include" "$MERGED/include"
  link_all "$TOOLKIT/lib64" "$MERGED/lib64"
  link_all "$TOOLKIT/lib" "$MERGED/lib64"
  for d in nvvm targets; do [ ! -e "$TOOLKIT/$d" ] || ln -s "$TOOLKIT/$d" "$MERGED/$d"; done
  # cu13 packages: nvidia/cu13/{include,lib}; cu12 packages: nvidia/<component>/{include,lib}
  for pkg in "$SITE"/nvidia/*/; do
    link_all "$pkg/include" "$MERGED/include"
    link_all "$pkg/lib" "$MERGED/lib64"
  done
  (cd "$MERGED/lib64" && for f in lib*.so.*; do
     [ -e "$f" ] || continue; base=${f%%.so.*}.so; [ -e "$base" ] || ln -s "$f" "$base"; done)
  ln -s lib64 "$MERGED/lib"
  for lib in libcudart.so libnvrtc.so libcublas.so; do
    [ -e "$MERGED/lib64/$lib" ] || { echo "build_wheels.sh: $lib is in neither $TOOLKIT nor torch's nvidia" \
      "packages: torch's CMake config needs it" >&2; exit 1; }
  done
  export CUDA_HOME="$MERGED" CUDA_PATH="$MERGED" CUDACXX="$MERGED/bin/nvcc" PATH="$MERGED/bin:$PATH"
  CMAKE_ARGS+=("-DCUDA_TOOLKIT_ROOT_DIR=$MERGED" "-DCUDAToolkit_ROOT=$MERGED")
  echo "== building the CUDA wheel: python $("$PYTHON" -c 'import platform; print(platform.python_version())')," \
       "torch $TORCH_VERSION, CUDA $TORCH_CUDA, nvcc $NVCC_CUDA ($TOOLKIT), archs $TORCH_CUDA_ARCH_LIST"
else
  echo "== building the CPU wheel: torch $TORCH_VERSION"
fi
export FUSEDATTN_CMAKE_ARGS="${CMAKE_ARGS[*]}"

# The setuptools build dir keeps one CMake tree per torch build (build/temp*/cmake-<tag>): rebuilding a wheel for
# the same torch is incremental. build/lib* is cleared so that no file of another build lands in the wheel.
rm -rf build/lib.* build/bdist.*
t0=$(date +%s)
# --no-build-isolation: compile against the torch installed here (an isolated build would fetch another one).
"$PYTHON" -m pip wheel . --no-build-isolation --no-deps -w "$OUT" -q --disable-pip-version-check
tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
wheel=$(ls -t "$OUT"/fusedattn-*-"$tag"-*.whl | head -1)

# The wheel must carry the binary, the record of the torch it was built for and every package.
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
echo "== wheel: $wheel ($(du -h "$wheel" | cut -f1), built in $(( $(date +%s) - t0 )) s)"
