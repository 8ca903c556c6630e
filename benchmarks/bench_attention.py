"""Attention benchmark: fusedattn vs torch SDPA, measured in the same run on the same inputs.

    python benchmarks/bench_attention.py                 # the CPU table of the foundation issue
    python benchmarks/bench_attention.py --quick         # a small subset (< 1 minute on 2 cores)
    python benchmarks/bench_attention.py --out benchmarks/results

Method: each case builds one set of inputs; every backend's output is checked against the
float64 reference on a slice before it is timed; each timing is the median of ``--repeats`` runs
after a warm-up (spread = min..max printed). FLOPs = 4*B*H*Lq*Lk*D (x0.5 causal); backward
counts 2.5x the forward, so fwd+bwd = 3.5x. Peak extra memory is measured in a child process as
the peak resident set during the call minus the resident set before it (Linux VmHWM, reset through
/proc/self/clear_refs); it includes the output tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import fusedattn
from fusedattn.reference import attention_ref


@dataclass
class Case:
    B: int
    H: int
    L: int
    D: int
    dtype: str
    causal: bool
    mode: str  # "fwd" or "fwd+bwd"


@dataclass
class Row:
    case: Case
    backend: str
    median_ms: float
    min_ms: float
    max_ms: float
    gflops: float
    peak_extra_mib: float | None
    max_err: float


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = fusedattn._ops.build_info()
    return {
        "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fusedattn_cpu_isa": info.get("cpu_isa_selected"), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def flops(c: Case) -> float:
    f = 4.0 * c.B * c.H * c.L * c.L * c.D * (0.5 if c.causal else 1.0)
    return f * (3.5 if c.mode == "fwd+bwd" else 1.0)


def make_inputs(c: Case, requires_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c.B, c.H, c.L, c.D, generator=g, dtype=DTYPES[c.dtype]).requires_grad_(requires_grad)
            for _ in range(3)]


def backends() -> dict:
    """name -> fn(q, k, v, causal) returning out. Peers measured in the same run."""
    return {
        "fusedattn": lambda q, k, v, causal: fusedattn.attention(q, k, v, causal=causal, backend="cpu"),
        "torch_sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }


def check(fn, c: Case) -> float:
    """Max abs error vs the float64 reference on the first 2 heads (also the correctness gate)."""
    q, k, v = (t[:, :2].contiguous() for t in make_inputs(c, False))
    out = fn(q, k, v, c.causal)
    ref = attention_ref(q, k, v, causal=c.causal, compute_dtype=torch.float64)
    return (out.double() - ref.double()).abs().max().item()


def time_case(fn, c: Case, repeats: int) -> list[float]:
    q, k, v = make_inputs(c, c.mode == "fwd+bwd")
    grad = torch.randn(c.B, c.H, c.L, c.D, dtype=q.dtype) if c.mode == "fwd+bwd" else None

    def run():
        if grad is None:
            with torch.no_grad():
                fn(q, k, v, c.causal)
        else:
            q.grad = k.grad = v.grad = None
            fn(q, k, v, c.causal).backward(grad)

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


_MEM_CHILD = r"""
import json, sys, torch, fusedattn
sys.path.insert(0, {bench_dir!r})
import bench_attention as b
c = b.Case(**json.loads(sys.argv[1])); fn = b.backends()[sys.argv[2]]
torch.set_num_threads({threads})
q, k, v = b.make_inputs(c, False)
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024.0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = rss("VmRSS:")
with torch.no_grad():
    out = fn(q, k, v, c.causal)
print(json.dumps(rss("VmHWM:") - base))
"""


def peak_extra_mib(backend: str, c: Case) -> float | None:
    """Peak resident memory added by one forward call, measured in a fresh process."""
    if c.mode != "fwd" or not os.path.exists("/proc/self/clear_refs"):
        return None
    code = _MEM_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), threads=torch.get_num_threads())
    try:
        res = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(c)), backend], capture_output=True,
                             text=True, timeout=1800, check=True)
        return float(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(1, 8, 1024, 64, dt, causal, "fwd") for dt in ("fp32", "bf16") for causal in (False, True)]
    out = [Case(1, 8, L, 64, dt, causal, mode)
           for mode in ("fwd", "fwd+bwd") for dt in ("fp32", "bf16") for causal in (False, True)
           for L in (512, 2048, 8192) if not (mode == "fwd+bwd" and L == 8192)]
    out.append(Case(1, 8, 32768, 64, "fp32", False, "fwd"))  # the memory case: must stay < 1 GiB extra
    return out


def repeats_for(c: Case, default: int) -> int:
    return 1 if c.L >= 32768 else 3 if c.L >= 8192 else default


def run(quick: bool, repeats: int, memory: bool, out_dir: str | None) -> list[Row]:
    rows: list[Row] = []
    fns = backends()
    for c in cases(quick):
        for name, fn in fns.items():
            err = check(fn, c) if c.L <= 8192 else float("nan")
            times = time_case(fn, c, repeats_for(c, repeats)) if c.L < 32768 or name == "fusedattn" else None
            mem = peak_extra_mib(name, c) if memory and (c.L >= 32768 or c.L == 2048) else None
            if times is None:
                continue
            med = statistics.median(times)
            rows.append(Row(c, name, med, min(times), max(times), flops(c) / med / 1e6, mem, err))
            print(format_row(rows[-1], rows), flush=True)
    if out_dir:
        write_results(rows, out_dir, quick)
    return rows


def _peer(row: Row, rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.case == row.case and r.backend == "torch_sdpa"), None)


def format_row(r: Row, rows: list[Row]) -> str:
    c, peer = r.case, _peer(r, rows)
    ratio = f"{peer.median_ms / r.median_ms:5.2f}x" if peer and r.backend != "torch_sdpa" else "     "
    mem = f"{r.peak_extra_mib:8.1f}" if r.peak_extra_mib is not None else "       -"
    return (f"{c.mode:8s} {c.dtype:5s} causal={int(c.causal)} B={c.B} H={c.H} L={c.L:6d} D={c.D:3d} "
            f"{r.backend:11s} {r.median_ms:10.2f} ms [{r.min_ms:.2f}..{r.max_ms:.2f}] "
            f"{r.gflops:7.1f} GFLOP/s  mem {mem} MiB  err {r.max_err:.1e}  {ratio}")


def write_results(rows: list[Row], out_dir: str, quick: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tag = "cpu_attention" + ("_quick" if quick else "")
    info = machine_info()
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
        json.dump({"machine": info, "rows": [dict(asdict(r), ratio_vs_torch=(
            _peer(r, rows).median_ms / r.median_ms if _peer(r, rows) else None)) for r in rows]}, f, indent=1)
    lines = [f"# CPU attention: fusedattn vs torch SDPA ({info['date']})", "",
             f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']} "
             f"(ATen CPU capability {info['torch_cpu_capability']}), fusedattn kernel ISA {info['fusedattn_cpu_isa']}.",
             "Command: `python benchmarks/bench_attention.py" + (" --quick" if quick else "") + " --out benchmarks/results`",
             "FLOPs = 4*B*H*L^2*D (x0.5 causal, x3.5 fwd+bwd). Time: median of repeats [min..max]. "
             "Ratio = torch time / fusedattn time (> 1: fusedattn faster). Peak extra memory: peak RSS during one "
             "forward call minus RSS before it (includes the output). err = max |out - float64 reference|.", "",
             "| mode | dtype | causal | L | fusedattn ms | torch SDPA ms | ratio | fusedattn GFLOP/s | torch GFLOP/s "
             "| fusedattn extra MiB | torch extra MiB | fusedattn err | torch err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.backend != "fusedattn":
            continue
        p = _peer(r, rows)
        fmt_mem = lambda x: f"{x:.0f}" if x is not None else "-"  # noqa: E731
        lines.append(
            f"| {r.case.mode} | {r.case.dtype} | {int(r.case.causal)} | {r.case.L} | "
            f"{r.median_ms:.1f} [{r.min_ms:.1f}..{r.max_ms:.1f}] | "
            + (f"{p.median_ms:.1f} [{p.min_ms:.1f}..{p.max_ms:.1f}] | {p.median_ms / r.median_ms:.2f}x | "
               if p else "- | - | ")
            + f"{r.gflops:.1f} | " + (f"{p.gflops:.1f}" if p else "-") + f" | {fmt_mem(r.peak_extra_mib)} | "
            + (fmt_mem(p.peak_extra_mib) if p else "-") + f" | {r.max_err:.1e} | " + (f"{p.max_err:.1e}" if p else "-")
            + " |")
    with open(os.path.join(out_dir, f"{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/{tag}.md and .json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small subset, under a minute on 2 cores")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the (slower) peak-memory child processes")
    ap.add_argument("--out", default=None, help="directory for the .md table and .json results")
    args = ap.parse_args(argv)
    print(json.dumps(machine_info()))
    run(args.quick, args.repeats, not args.no_memory and not args.quick, args.out)


if __name__ == "__main__":
    main()
