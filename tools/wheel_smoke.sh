#!/usr/bin/env bash
# CI wheel step: build the CPU wheel, install it into a fresh venv with torch==2.13.0, and smoke-test it from
# outside the source tree (import, every public op on small inputs, `python -m fusedattn info`).
#
#   tools/wheel_smoke.sh              # builds with the torch of `python` (must be the CPU 2.13 build)
#   KEEP=1 tools/wheel_smoke.sh       # keep the work dir (wheel and venv) for inspection
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fusedattn_wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "work dir: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
t0=$(date +%s)

PYTHON=$PYTHON "$ROOT/tools/build_wheels.sh" --out "$WORK/dist"
wheel=$(ls "$WORK"/dist/fusedattn-*.whl)
t1=$(date +%s)

echo "== fresh venv: $TORCH_PIN + $(basename "$wheel")"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# numpy: torch warns at import without it. The wheel's own dependency (torch) is already satisfied.
"$VPY" -m pip install -q --disable-pip-version-check "$TORCH_PIN" 'numpy<2.4'
"$VPY" -m pip install -q --disable-pip-version-check "$wheel"
"$VPY" -m pip check
t2=$(date +%s)

echo "== smoke test from $WORK (outside the source tree)"
cp "$ROOT/tools/wheel_smoke.py" "$WORK/"
cd "$WORK"
env -u PYTHONPATH "$VPY" -m fusedattn info
env -u PYTHONPATH "$VPY" wheel_smoke.py --source-tree "$ROOT"
t3=$(date +%s)
echo "== wheel step: build $((t1 - t0)) s, venv + install $((t2 - t1)) s, smoke $((t3 - t2)) s"
