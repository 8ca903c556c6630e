"""The CUDA kernels of csrc/cuda, run on the CPU by a small SIMT emulator (tests/cuda_emu), against a float64
reference: forward (out, lse), backward (dq, dk, dv) and paged split-KV decode with an in-place append.

The emulator runs each CUDA thread as an OS thread and implements mma.sync m16n8k16, ldmatrix (plain and .trans),
cp.async and warp shuffles from the PTX ISA's definitions, so a wrong fragment index, tile bound or mask shows up
here on a machine without a GPU (a deliberately swapped B fragment or an off-by-one mask fails every case). It does
not model timing: races and asynchronous-copy hazards are for compute-sanitizer on a GPU (benchmarks/gpu_session.sh).
About 1 minute on 2 cores: one g++ build and eleven cases (see tests/cuda_emu/emu_main.cpp).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler found")
def test_cuda_kernels_on_the_emulator(tmp_path):
    exe = tmp_path / "emu_main"
    cmd = [
        CXX,
        "-std=c++20",
        "-O2",
        "-pthread",
        "-Wno-unknown-pragmas",
        "-DFUSEDATTN_CUDA_EMULATE",
        f"-I{ROOT / 'tests' / 'cuda_emu' / 'include'}",
        f"-I{ROOT / 'csrc'}",
        str(ROOT / "tests" / "cuda_emu" / "emu_main.cpp"),
        "-o",
        str(exe),
    ]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"emulator build failed:\n{build.stderr[-4000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "PASSED" in run.stdout, (
        f"emulated kernels disagree with the reference:\n{run.stdout}"
    )
