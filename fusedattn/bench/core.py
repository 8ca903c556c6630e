"""The benchmark engine behind ``python -m fusedattn bench`` and ``benchmarks/bench_*.py``.

Method (stated again in every result file):
  * every backend gets the same inputs; its output is compared with the float64 reference before
    its time is reported (a backend that fails the check is listed as WRONG, with no time);
  * a warm-up call per backend, then ``repeats`` timed calls taken round-robin across the backends
    (so drifts in machine speed hit all alike), the order shuffled each round (so each backend
    follows each of the others about equally often): median with the min..max spread; on CUDA, CUDA
    events around each call and a 256 MiB buffer rewritten between calls (flushes L2); on the
    CPU, ``time.perf_counter`` and, for memory-bound families, a 64 MiB buffer read between calls
    so the cache does not hold the data (read, not written: see _Flusher); Python's garbage collector
    is off while timing;
  * peak extra memory: CUDA ``max_memory_allocated`` minus what was allocated before the call;
    CPU the peak resident set during one call minus the resident set before it, in a fresh child
    process (Linux VmHWM, reset through /proc/self/clear_refs). Both include the output.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Row:
    family: str
    case: dict
    backend: str
    status: str  # "ok", "WRONG (err ...)", "absent: ...", "error: ..."
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    metric: Optional[float] = None  # GFLOP/s (compute families) or GB/s (memory-bound families)
    metric_name: str = ""
    peak_extra_mib: Optional[float] = None
    max_err: Optional[float] = None
    extra: dict = field(default_factory=dict)


def machine_info(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from .. import _ops

    bi = _ops.build_info()
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fusedattn_cpu_isa": bi.get("cpu_isa_selected"),
        "fusedattn_cuda": bi.get("cuda"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["gpu_clocks"] = q.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["gpu_clocks"] = None
    return info


class _Flusher:
    """Evicts the caches between timed calls by touching a buffer larger than the last-level cache.

    On CUDA the buffer is rewritten (the usual L2 flush). On the CPU it is read: rewriting it would leave
    the caches full of dirty lines that the next timed call has to write back to memory -- 32 MiB of
    writes charged to a memory-bound kernel that reads 128 MiB, ~25% more traffic that is not its own."""

    def __init__(self, device: str, enabled: bool):
        self.buf = None
        self.device = device
        if enabled:
            mib = 256 if device == "cuda" else 64
            self.buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        if self.buf is None:
            return
        if self.device == "cuda":
            self.buf.fill_(1.0)
        else:
            self.buf.sum()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(fns: dict, device: str, repeats: int, flush: bool) -> dict:
    """Milliseconds per call for each of ``fns`` (name -> zero-argument callable), one entry per
    repeat. Each backend is warmed up once, then the repeats go round-robin, so a drift in the
    machine's speed (turbo, a noisy neighbour) hits every backend alike. The order is shuffled each
    round (a fixed seed, so runs are repeatable): a call pays for what the call before it left behind
    (on the CPU, the call right after a 256 MiB copy measured ~6% slower, with the same kernel in
    every slot), so no backend may always follow the same one -- as it would in a fixed order, or in
    a rotated one (A B C, B C A, ... keeps C before A). Python's garbage
    collector is off meanwhile (as in ``timeit``): a collection would land in some timed call."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return _round_robin(fns, device, repeats, flush)
    finally:
        if gc_was_on:
            gc.enable()


def round_orders(names: list, repeats: int, seed: int = 0) -> list:
    """One order of ``names`` per round: a seeded shuffle each round."""
    rng = random.Random(seed)
    orders = []
    for _ in range(repeats):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def _round_robin(fns: dict, device: str, repeats: int, flush: bool) -> dict:
    flusher = _Flusher(device, flush)
    for fn in fns.values():
        fn()
    sync(device)
    times: dict = {name: [] for name in fns}
    for order in round_orders(list(fns), repeats):
        for name in order:
            fn = fns[name]
            flusher()
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def time_fn(fn: Callable[[], object], device: str, repeats: int, flush: bool) -> list[float]:
    """Milliseconds per call, one entry per repeat, after one warm-up call."""
    return time_round_robin({"fn": fn}, device, repeats, flush)["fn"]


def cuda_peak_extra_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()  # noqa: F841  (kept alive until the peak is read)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


_MEM_CHILD = r"""
import json, sys, torch
import fusedattn.bench as fb
fam = fb.FAMILIES[sys.argv[1]]
case = json.loads(sys.argv[2]); backend = sys.argv[3]
torch.set_num_threads(int(sys.argv[4]))
fn = fam.backends("cpu")[backend]
inputs = fam.make_inputs(case, "cpu", requires_grad=False)
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024.0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS:")
with torch.no_grad():
    out = fam.call(fn, inputs, case)
print(json.dumps(rss("VmHWM:") - base))
"""


def cpu_peak_extra_mib(family: str, case: dict, backend: str) -> Optional[float]:
    """Peak resident memory added by one call, measured in a fresh process (Linux only)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    try:
        res = subprocess.run(
            [sys.executable, "-c", _MEM_CHILD, family, json.dumps(case), backend, str(torch.get_num_threads())],
            capture_output=True,
            text=True,
            timeout=3600,
            check=True,
        )
        return float(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def summarize(rows: list[Row], family, info: dict) -> list[str]:
    """A markdown table: one line per case, fusedattn first, then every peer with its ratio."""
    names = []
    for r in rows:
        if r.backend not in names:
            names.append(r.backend)
    lines = [
        f"# {family.title} ({info['device']}, {info['date']})",
        "",
        f"Machine: {info.get('gpu') or info['cpu']}; {info['threads']} CPU threads; torch {info['torch']}; "
        f"triton {info.get('triton')}; fusedattn CPU kernel ISA {info.get('fusedattn_cpu_isa')}.",
        "",
        family.formula,
        "Ratio = peer time / fusedattn time (> 1: fusedattn is faster). Time: median "
        "[min..max] of the repeats. Extra MiB: peak memory added by one call (includes the output). "
        "err: max |out - float64 reference|.",
        "",
    ]
    absent = [r for r in rows if r.status.startswith("absent")]
    for r in {r.backend: r for r in absent}.values():
        lines.append(f"- `{r.backend}`: {r.status}")
    if absent:
        lines.append("")
    case_keys = list(rows[0].case.keys()) if rows else []
    extra = getattr(family, "extra_columns", [])  # (header, fn(fusedattn row) -> cell) of the family
    header = case_keys + ["fusedattn ms", family.metric_name, "extra MiB", "err"] + [h for h, _ in extra]
    peers = [n for n in names if n != "fusedattn" and any(r.backend == n and r.status == "ok" for r in rows)]
    for p in peers:
        header += [f"{p} ms", f"ratio vs {p}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seen = []
    for r in rows:
        if r.case in seen or r.status.startswith("absent"):  # an absent peer is listed above the table
            continue
        seen.append(r.case)
        by = {x.backend: x for x in rows if x.case == r.case}
        ours = by.get("fusedattn")
        cells = [str(r.case[k]) for k in case_keys]
        if ours and ours.status == "ok":
            cells += [
                f"{ours.median_ms:.2f} [{ours.min_ms:.2f}..{ours.max_ms:.2f}]",
                f"{ours.metric:.1f}",
                "-" if ours.peak_extra_mib is None else f"{ours.peak_extra_mib:.0f}",
                f"{ours.max_err:.1e}",
            ]
            cells += [fn(ours) for _, fn in extra]
        else:
            cells += [ours.status if ours else "-", "-", "-", "-"] + ["-" for _ in extra]
        for p in peers:
            x = by.get(p)
            if x is None or x.status != "ok":
                cells += [x.status if x else "-", "-"]
            else:
                ratio = f"{x.median_ms / ours.median_ms:.2f}x" if ours and ours.status == "ok" else "-"
                cells += [f"{x.median_ms:.2f}", ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(rows: list[Row], family, info: dict, out_dir: str, tag: str) -> list[str]:
    """Writes <tag>.md, .csv, .json (and .png plots when matplotlib is installed); returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    extra = getattr(family, "extra_columns", [])  # (header, fn(row) -> cell): in every file
    md = os.path.join(out_dir, f"{tag}.md")
    with open(md, "w") as f:
        f.write("\n".join(summarize(rows, family, info)) + "\n")
    paths.append(md)
    js = os.path.join(out_dir, f"{tag}.json")
    with open(js, "w") as f:
        json.dump(
            {
                "machine": info,
                "method": __doc__,
                "formula": family.formula,
                "rows": [dict(asdict(r), **{h: fn(r) for h, fn in extra}) for r in rows],
            },
            f,
            indent=1,
        )
    paths.append(js)
    cs = os.path.join(out_dir, f"{tag}.csv")
    case_keys = list(rows[0].case.keys()) if rows else []
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            case_keys
            + ["backend", "status", "median_ms", "min_ms", "max_ms", family.metric_name, "peak_extra_mib", "max_err"]
            + [h for h, _ in extra]
        )
        for r in rows:
            w.writerow(
                [r.case[k] for k in case_keys]
                + [r.backend, r.status, r.median_ms, r.min_ms, r.max_ms, r.metric, r.peak_extra_mib, r.max_err]
                + [fn(r) for _, fn in extra]
            )
    paths.append(cs)
    paths += family.plot(rows, info, out_dir, tag)
    return paths


def try_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot_vs_length(
    rows: list[Row],
    info: dict,
    out_dir: str,
    tag: str,
    *,
    family: str,
    group: Callable[[dict], tuple],
    title: Callable[[tuple], str],
    xlabel: str,
    ylabel: str,
    hline: Optional[tuple[float, str]] = None,
) -> list[str]:
    """Each backend's metric against case["L"] (log2 axis), one panel per group(case), an optional
    horizontal reference line (value, label); writes <tag>.png and returns its path (none without
    matplotlib)."""
    plt = try_matplotlib()
    ok = [r for r in rows if r.status == "ok"]
    if plt is None or not ok:
        return []
    groups = sorted({group(r.case) for r in ok})
    ncol = min(4, len(groups))
    nrow = -(-len(groups) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        sel = [r for r in ok if group(r.case) == g]
        for b in dict.fromkeys(r.backend for r in sel):
            pts = sorted((r.case["L"], r.metric) for r in sel if r.backend == b)
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=b,
                linewidth=2.5 if b == "fusedattn" else 1.2,
            )
        if hline is not None:
            ax.axhline(hline[0], linestyle="--", color="gray", linewidth=1, label=hline[1])
        ax.set_xscale("log", base=2)
        ax.set_title(title(g), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(f"{family} on {info.get('gpu') or info['cpu']} ({info['threads']} threads)", fontsize=10)
    fig.tight_layout()
    path = f"{out_dir}/{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def progress(items, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)
    except ImportError:
        return items


TIME_CAP = "skipped (time cap)"  # the status of a case (or backend) not started because the deadline had passed


def parse_where(specs: Optional[list[str]]) -> list[tuple[Optional[str], str, list[str]]]:
    """``[FAMILY:]KEY=V1,V2`` filters -> (family or None for every family, key, allowed values as strings)."""
    out = []
    for spec in specs or []:
        fam, _, cond = spec.partition(":") if ":" in spec.split("=", 1)[0] else ("", "", spec)
        key, eq, vals = cond.partition("=")
        if not eq or not key or not vals:
            raise ValueError(f"--where takes [FAMILY:]KEY=V1,V2, got {spec!r}")
        out.append((fam or None, key, vals.split(",")))
    return out


def select_cases(cases: list[dict], family: str, where) -> list[dict]:
    """The cases that pass every filter of ``where`` (parse_where) naming this family or no family; a filter on a
    key the family's cases lack is an error (a typo would otherwise select nothing, or everything)."""
    for fam, key, vals in where:
        if fam not in (None, family):
            continue
        if cases and key not in cases[0]:
            raise ValueError(f"--where {key}=...: the {family} cases have no {key!r} (keys: {', '.join(cases[0])})")
        cases = [c for c in cases if str(c[key]) in vals]
    return cases


def run_family(
    family,
    *,
    device: str,
    dtypes: Optional[list[str]],
    quick: bool,
    repeats: int,
    memory: bool,
    out_dir: Optional[str],
    where=(),
    deadline: Optional[float] = None,
    write: bool = True,
) -> list[Row]:
    """Measures every case of ``family`` (those ``where`` selects) and returns the rows. ``deadline``
    (a time.monotonic() value): cases, and backends within a case, not started by then are listed as
    TIME_CAP rows instead of run, so a capped run always ends with its tables. ``write``: write the
    family's <device>_<family>[_quick].{md,csv,json,png} into ``out_dir``."""
    info = machine_info(device)
    if hasattr(family, "prepare"):  # measurements the family's table refers to (decode: copy bandwidth)
        family.prepare(device)
    cases = select_cases(family.cases(quick=quick, device=device, dtypes=dtypes), family.name, where)
    backends = family.backends(device, quick=quick)
    rows: list[Row] = []
    for name, fn in backends.items():
        if isinstance(fn, str):
            rows.append(Row(family.name, {k: "-" for k in (cases[0] if cases else {})}, name, f"absent: {fn}"))
    fns = {n: f for n, f in backends.items() if not isinstance(f, str)}
    # the family may measure its cases in another order than its table lists them (attention on CUDA: one
    # length of every kind first, so that a time cap cuts lengths, not kinds)
    order = family.run_order(cases, device) if hasattr(family, "run_order") else cases
    for case in progress(order, family.name):
        if deadline is not None and time.monotonic() >= deadline:
            case_rows = [Row(family.name, case, name, TIME_CAP, metric_name=family.metric_name) for name in fns]
        else:
            case_rows = measure_case(family, case, fns, device, repeats, memory, deadline=deadline)
        rows += case_rows
        for r in case_rows:
            print(family.format_row(r, rows), flush=True)
    capped = sum(all(r.status == TIME_CAP for r in rows if r.case == c) for c in cases)
    if capped:
        print(f"{family.name}: {capped} of {len(cases)} cases not run: time cap reached", flush=True)
    position = {json.dumps(c, sort_keys=True): i for i, c in enumerate(cases)}
    rows = sorted(
        (r for r in rows if not r.status.startswith("absent")),
        key=lambda r: position[json.dumps(r.case, sort_keys=True)],
    ) + [r for r in rows if r.status.startswith("absent")]
    if out_dir and write:
        tag = f"{device}_{family.name}" + ("_quick" if quick else "")
        for p in write_results(rows, family, info, out_dir, tag):
            print(f"wrote {p}")
    return rows


def write_bundle(results: list, out_dir: str, name: str, device: str) -> list[str]:
    """Every family's results in few files (for a session whose output is limited to a few files):
    <name>.md (the tables one after the other), <name>.json ({"machine", "method", "families": {family:
    {"formula", "rows"}}}), <name>.csv (one header: a "family" column, the union of the case keys and of the
    extra columns), and each family's <device>_<family>.png. ``results``: (family module, rows, info)."""
    os.makedirs(out_dir, exist_ok=True)
    md, js, cs = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("md", "json", "csv"))
    with open(md, "w") as f:
        f.write("\n\n".join("\n".join(summarize(rows, fam, info)) for fam, rows, info in results) + "\n")
    with open(js, "w") as f:
        json.dump(
            {
                "machine": results[0][2] if results else machine_info(device),
                "method": __doc__,
                "families": {
                    fam.name: {
                        "formula": fam.formula,
                        "rows": [
                            dict(asdict(r), **{h: fn(r) for h, fn in getattr(fam, "extra_columns", [])}) for r in rows
                        ],
                    }
                    for fam, rows, _ in results
                },
            },
            f,
            indent=1,
        )
    keys = list(dict.fromkeys(k for _, rows, _ in results for r in rows[:1] for k in r.case))
    extras = list(dict.fromkeys(h for fam, _, _ in results for h, _ in getattr(fam, "extra_columns", [])))
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["family"]
            + keys
            + [
                "backend",
                "status",
                "median_ms",
                "min_ms",
                "max_ms",
                "metric_name",
                "metric",
                "peak_extra_mib",
                "max_err",
            ]
            + extras
        )
        for fam, rows, _ in results:
            ex = dict(getattr(fam, "extra_columns", []))
            for r in rows:
                w.writerow(
                    [fam.name]
                    + [r.case.get(k, "") for k in keys]
                    + [
                        r.backend,
                        r.status,
                        r.median_ms,
                        r.min_ms,
                        r.max_ms,
                        fam.metric_name,
                        r.metric,
                        r.peak_extra_mib,
                        r.max_err,
                    ]
                    + [ex[h](r) if h in ex else "" for h in extras]
                )
    paths = [md, js, cs]
    for fam, rows, info in results:
        paths += fam.plot(rows, info, out_dir, f"{device}_{fam.name}")
    return paths


def measure_case(
    family, case: dict, fns: dict, device: str, repeats: int, memory: bool, deadline: Optional[float] = None
) -> list[Row]:
    """Check every backend on ``case``, then time those that passed, round-robin, on one set of inputs.
    A backend whose turn comes after ``deadline`` (time.monotonic()) is listed as TIME_CAP."""
    rows = {name: Row(family.name, case, name, "ok", metric_name=family.metric_name) for name in fns}
    timed = {}
    inputs = None
    for name, fn in fns.items():
        row = rows[name]
        if deadline is not None and time.monotonic() >= deadline:
            row.status = TIME_CAP
            continue
        try:
            err, tol = family.check(fn, case, device)
            row.max_err = err
            if not err <= tol:
                row.status = f"WRONG (err {err:.1e} > {tol:.1e})"
            elif not family.should_time(case, name):
                row.status = "skipped (too slow for this peer)"
            else:
                if inputs is None:
                    inputs = family.make_inputs(case, device, requires_grad=family.needs_grad(case))
                family.call(fn, inputs, case)  # fails here, not in the timing loop, if it cannot run
                timed[name] = (lambda f: lambda: family.call(f, inputs, case))(fn)
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    if timed:
        # the family's companions (decode: a copy, for the machine's bandwidth) share the round-robin
        extra = family.companions(case, device) if hasattr(family, "companions") else {}
        times = time_round_robin(
            {**timed, **{f"companion:{n}": f for n, f in extra.items()}},
            device,
            family.repeats(case, repeats),
            flush=family.flush,
        )
        for n in extra:
            family.companion_times(case, n, times.pop(f"companion:{n}"))
        for name, t in times.items():
            row = rows[name]
            row.median_ms, row.min_ms, row.max_ms = statistics.median(t), min(t), max(t)
            row.metric = family.work(case) / (row.median_ms * 1e-3) / getattr(family, "metric_scale", 1e9)
            if memory and family.measure_memory(case):
                if device == "cuda":
                    row.peak_extra_mib = cuda_peak_extra_mib(timed[name])
                else:
                    row.peak_extra_mib = cpu_peak_extra_mib(family.name, case, name)
    return list(rows.values())


def measure(family, case: dict, name: str, fn, device: str, repeats: int, memory: bool) -> Row:
    """One backend on one case (see measure_case)."""
    return measure_case(family, case, {name: fn}, device, repeats, memory)[0]
