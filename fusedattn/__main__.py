"""Command line: ``python -m fusedattn {info,demo,bench}``.

python -m fusedattn info                 # versions, compiled backends, why a missing one is missing
python -m fusedattn demo                 # fusedattn vs torch SDPA on this machine's default device
python -m fusedattn bench --quick --out DIR   # benchmark tables, CSV/JSON and plots (see fusedattn.bench)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fusedattn
from fusedattn import _ops
from fusedattn.dispatch import available_backends


def info() -> None:
    bi = _ops.build_info()
    try:  # the full version of this build, with the local tag naming its torch (written by setup.py)
        from fusedattn._build_torch import BUILD_VERSION as version
    except ImportError:
        version = fusedattn.__version__
    print(f"fusedattn {version}  (python {platform.python_version()}, torch {torch.__version__})")
    if bi:
        print(
            f"  compiled extension: built against torch {bi['torch_version']} with {bi['compiler']}"
            f"{' (ASAN/UBSAN)' if bi.get('sanitized') else ''}"
        )
        print(
            f"  CPU kernels built for: {bi['cpu_isas']}; used here: {bi['cpu_isa_selected']} "
            f"(torch reports CPU capability {torch.backends.cpu.get_cpu_capability()})"
        )
        if "cpu_bf16_forward" in bi:
            print(f"  CPU bf16 attention forward: {bi['cpu_bf16_forward']}")
        print(f"  CUDA kernels: {'yes' if bi['cuda'] else 'no'} ({bi['cuda_reason']})")
        if bi["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
            print(
                f"  WARNING: running torch {torch.__version__} but the extension was built for "
                f"{bi['torch_version']}: rebuild with `pip install -e . --no-build-isolation`"
            )
    else:
        print(f"  compiled extension: not loaded ({_ops._C_IMPORT_ERROR})")
    try:
        import triton  # noqa: F401

        triton_state = f"triton {triton.__version__} importable"
    except ImportError:
        triton_state = "triton not installed"
    print(f"  {triton_state}; CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print("  backends:")
    for name, reason in available_backends().items():
        print(f"    {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def demo(L: int) -> None:
    """Forward attention, B=1 H=8 D=64, fp32 and bf16, causal and not: fusedattn vs torch SDPA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"fusedattn.attention vs torch.nn.functional.scaled_dot_product_attention on {device}, "
        f"B=1 H=8 L={L} D=64, {torch.get_num_threads()} threads (median of 5)"
    )
    print(
        f"{'dtype':9s} {'causal':6s} {'fusedattn ms':>12s} {'torch ms':>9s} {'ratio':>6s} "
        f"{'GFLOP/s':>8s} {'max err vs fp64 ref':>20s}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(1, 8, L, 64, generator=g, device=device, dtype=dtype) for _ in range(3))
            ours = _median_ms(lambda: fusedattn.attention(q, k, v, causal=causal))
            theirs = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            ref = fusedattn.attention_ref(q, k, v, causal=causal, compute_dtype=torch.float64)
            err = (fusedattn.attention(q, k, v, causal=causal).double() - ref.double()).abs().max().item()
            gflops = 4 * 8 * L * L * 64 * (0.5 if causal else 1.0) / ours / 1e6
            print(
                f"{str(dtype).replace('torch.', ''):9s} {str(causal):6s} {ours:12.2f} {theirs:9.2f} "
                f"{theirs / ours:5.2f}x {gflops:8.1f} {err:20.2e}"
            )


def main(argv=None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: python -m fusedattn bench --help
        from .bench import main as bench_main

        return bench_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m fusedattn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, compiled backends and why a missing one is missing")
    d = sub.add_parser("demo", help="fusedattn vs torch SDPA on the default device")
    d.add_argument("--seq-len", type=int, default=1024)
    sub.add_parser("bench", help="benchmark tables and plots: python -m fusedattn bench --help")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        info()
    else:
        demo(args.seq_len)


if __name__ == "__main__":
    main()
