"""Compile check of the Triton kernels on machines without a GPU (the tests otherwise run them interpreted).

Thin wrapper over tools/triton_compile_check.py, which drives the real torch ops with CPU tensors, captures every
kernel launch and compiles it to a cubin for sm_90 / sm_80. Here: a quick grid (fp16, sm_90) and a check that a
kernel the interpreter accepts but the compiler rejects fails the tool. The full grid (every dtype, both targets)
is the CI step ``<venv>/bin/python tools/triton_compile_check.py``. Skips when triton < 3 or its CUDA backend
(compiler and ptxas) is unavailable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "triton_compile_check.py"


def _cuda_backend_reason() -> str | None:
    try:
        import triton
    except ImportError as e:
        return f"triton is not installed ({e})"
    if int(triton.__version__.split(".")[0]) < 3:
        return f"triton {triton.__version__} < 3 (no GPUTarget / ASTSource compile API)"
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
        from triton import knobs

        if not os.access(knobs.nvidia.ptxas.path, os.X_OK):
            return f"ptxas not found ({knobs.nvidia.ptxas.path})"
    except Exception as e:  # noqa: BLE001  (any failure here means: skip)
        return f"triton's CUDA backend is unavailable ({type(e).__name__}: {e})"
    return None


REASON = _cuda_backend_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=str(REASON)), pytest.mark.slow]


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_quick_grid_compiles():
    r = _run("--quick", "--arch", "90", "--jobs", "2")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    m = re.search(r"SUMMARY: (\d+) compiles .*?, (\d+) failed", out)
    assert m and int(m.group(1)) > 0 and m.group(2) == "0", out[-3000:]


def test_a_kernel_the_compiler_rejects_fails_the_check(tmp_path):
    # A copy of the package whose decode kernels read a non-constexpr global: the interpreter runs that, the
    # compiler refuses it ("Cannot access global variable").
    for d in ("fusedattn", "kernels"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    src = (tmp_path / "kernels" / "decode.py").read_text()
    assert "tl.program_id(0)" in src
    src = src.replace("tl.program_id(0)", "(tl.program_id(0) + _NOT_CONSTEXPR)") + "\n_NOT_CONSTEXPR = 0\n"
    (tmp_path / "kernels" / "decode.py").write_text(src)
    r = _run("--source", str(tmp_path), "--arch", "90", "--jobs", "1", "--filter", "merge fp16 D=64")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-6000:]
    assert "COMPILE FAILED" in out and "_combine_lse" in out and "_NOT_CONSTEXPR" in out, out[-6000:]
