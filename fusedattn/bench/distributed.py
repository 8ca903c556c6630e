"""Distributed benchmark family: ``fusedattn.distributed.ring_attention`` over W CPU processes (gloo) vs one-process
``fusedattn.attention`` at the same total sequence length, and the ring's communication share.

``python -m fusedattn bench distributed [--world-size W]`` spawns its own world (``torch.multiprocessing.spawn``,
W processes, gloo over a free localhost TCP port) and measures every case there; ``bench all`` leaves it out (it
takes minutes: name it). Only the CPU: NCCL would need W GPUs.

Backends (rows):
  * ``fusedattn``: ring attention, each rank holding L/W tokens (causal: zigzag shards, the load-balanced layout;
    non-causal: plain shards), ``T`` threads per rank;
  * ``one_process``: ``fusedattn.attention`` on the whole sequence in one process (rank 0) with ``W*T`` threads,
    the other ranks idle in a barrier: the same cores, no communication.
  ``T`` = the parent's torch threads // W (at least 1).

Method:
  * correctness first, on a reduced copy of the case (L <= 1024, 2 heads): every rank compares its shard of the
    ring's output (and dq, dk, dv for fwd+bwd) with the float64 reference, beside one-process attention's error:
    the 2x rule (3x for gradients), else the row is WRONG and not timed. In bf16 the gradients' bound adds
    W * 2^-8 * max |grad|: the block backward returns each step's dq/dk/dv partial in bf16 (the kernel
    accumulates in float32 but rounds its outputs), so the ring's float32 sum carries W more roundings than one
    process's single call (measured: dv 3.1x one-process's error at L=1024, W=2);
  * timing: a warm-up of each variant, then ``repeats`` rounds in a seeded shuffled order (core.round_orders,
    the same on every rank); each call starts after a barrier, and its time is the slowest rank's
    (``time.perf_counter``, Python's garbage collector off): the ring's wall time as a caller sees it;
  * communication, three ways:
      - ``transfer share`` = "transfer only" / ring: "transfer only" is the ring's exchanges without its compute
        (the same blocks, sends and receives, step by step, each step waited for): what the transfers would cost
        if nothing overlapped them;
      - ``comm share`` = (ring - compute only) / ring, medians: "compute only" is the same ring, the same blocks,
        kernels and merges per step, with each send/recv replaced by a local copy of the block (no transport;
        its numbers are wrong, its work is the same). This is what communication costs the ring in all, the
        overlapped transfers' CPU time included (gloo runs the transfers on its own threads, which share the
        cores with the kernels);
      - ``wait share`` = the time ranks spend blocked in ``wait()`` on a transfer (not done when the block's
        compute finished: exposed communication, or a neighbour still computing), the mean over ranks, / the
        ring's time (median over repeats).
  The metric: GFLOP/s of the whole attention over the ring's (or the one process's) wall time.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from typing import Optional

import torch

from .core import TIME_CAP, Row, machine_info, plot_vs_length, round_orders, select_cases, write_results

name = "distributed"
title = "Ring attention (distributed, CPU gloo)"
metric_name = "GFLOP/s"
flush = False
in_all = False  # `bench all` leaves it out: it spawns its own processes and takes minutes
formula = (
    "FLOPs = 4*B*H*L^2*D (L the total length over all ranks), x0.5 when causal, x3.5 for fwd+bwd. fusedattn = "
    "ring_attention over W gloo processes (causal: zigzag shards, else plain), T threads each; one_process = "
    "fusedattn.attention on the whole sequence in one process, W*T threads. compute-only ms: the ring with every "
    "send/recv replaced by a local copy; transfer-only ms: the ring's sends/recvs without its compute; transfer "
    "share = transfer only / ring; comm share = (ring - compute only) / ring; wait share = time blocked on "
    "transfers (mean over ranks) / ring time. err (on the check case, L <= 1024, 2 heads): fusedattn's is the max "
    "over its output and (fwd+bwd) gradients, one_process's its output's; bf16 gradients may exceed 3x one "
    "process's error by W roundings of the per-step partials (see the module docstring)."
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHECK_L = 1024  # the correctness check's length (the float64 reference materializes the scores)


def _case(W, L, dt, causal, mode, B=1, H=8, D=64):
    return {"W": W, "B": B, "H": H, "L": L, "D": D, "dtype": dt, "causal": causal, "mode": mode}


def cases(*, quick: bool, device: str, dtypes: Optional[list[str]], world_size: int = 2) -> list[dict]:
    dts = dtypes or ["fp32", "bf16"]
    if quick:
        return [_case(world_size, 1024, dt, c, "fwd") for dt in dts for c in (True, False)]
    return [
        _case(world_size, L, dt, c, m)
        for m in ("fwd", "fwd+bwd")
        for dt in dts
        for c in (True, False)
        for L in (2048, 8192)
        if not (m == "fwd+bwd" and L > 2048 and dt != "fp32")  # the budget: fwd+bwd at 8k in fp32 only
    ]


def backends(device: str, quick: bool = False) -> dict:
    """For the in-process harnesses (benchmarks/test_bench_families.py): nothing runs in one process here."""
    why = "runs in its own spawned gloo world: python -m fusedattn bench distributed"
    return {"fusedattn": why, "one_process": why}


def repeats(case: dict, default: int) -> int:
    return 3 if case["L"] >= 8192 else default


def work(case: dict) -> float:
    f = 4.0 * case["B"] * case["H"] * case["L"] ** 2 * case["D"]
    return f * (0.5 if case["causal"] else 1.0) * (3.5 if case["mode"] == "fwd+bwd" else 1.0)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _ms(key: str):
    return lambda r: "-" if r.extra.get(key) is None else f"{r.extra[key]:.2f}"


extra_columns = [
    ("compute-only ms", _ms("compute_only_ms")),
    ("transfer-only ms", _ms("transfer_only_ms")),
    ("transfer share", lambda r: _pct(r.extra.get("transfer_share"))),
    ("comm share", lambda r: _pct(r.extra.get("comm_share"))),
    ("wait share", lambda r: _pct(r.extra.get("wait_share"))),
]


def format_row(r: Row, rows: list[Row]) -> str:
    c = r.case
    head = f"W={c['W']} {c['mode']:8s} {c['dtype']:5s} causal={int(c['causal'])} B={c['B']} H={c['H']} L={c['L']:6d}"
    if r.status != "ok":
        return f"{head} {r.backend:12s} {r.status}"
    tail = ""
    if r.backend == "fusedattn":
        tail = (
            f" compute-only {r.extra['compute_only_ms']:.2f} ms, transfer-only {r.extra['transfer_only_ms']:.2f} ms"
            f" ({_pct(r.extra['transfer_share'])}), comm share {_pct(r.extra['comm_share'])}, "
            f"wait share {_pct(r.extra['wait_share'])}"
        )
    return (
        f"{head} {r.backend:12s} {r.median_ms:10.2f} ms [{r.min_ms:.2f}..{r.max_ms:.2f}] {r.metric:7.1f} GFLOP/s "
        f"err {r.max_err:.1e}{tail}"
    )


def plot(rows: list[Row], info: dict, out_dir: str, tag: str) -> list[str]:
    """GFLOP/s vs total length: the ring and one process, one panel per (mode, dtype, causal)."""
    return plot_vs_length(
        rows,
        info,
        out_dir,
        tag,
        family=f"ring attention, {'/'.join(sorted({str(r.case['W']) for r in rows if r.status == 'ok'}))} gloo processes",
        group=lambda c: (c["mode"], c["dtype"], c["causal"]),
        title=lambda g: f"{g[0]} {g[1]} {'causal (zigzag)' if g[2] else 'non-causal'}",
        xlabel="total sequence length",
        ylabel="GFLOP/s",
    )


# ------------------------------------------------------------------------------------------------
# the worker side
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _compute_only():
    """The ring with each exchange replaced by a local copy of the blocks (the same steps, no transport)."""
    from .. import distributed as fd

    class _LocalRing(fd._Ring):
        def exchange(self, tensors, tag):
            return [t.contiguous().clone() for t in tensors], []

    saved = fd._Ring
    fd._Ring = _LocalRing
    try:
        yield
    finally:
        fd._Ring = saved


def _inputs(case: dict, L: int, H: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (case["B"], H, L, case["D"])
    return [torch.randn(shape, generator=g, dtype=DTYPES[case["dtype"]]) for _ in range(4)]  # q, k, v, dout


def _run(fn, q, k, v, dout):
    """fn(q, k, v) forward, or forward + backward with dout: the grads (detached) when dout is given."""
    if dout is None:
        with torch.no_grad():
            return [fn(q, k, v)]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _check(case: dict, rank: int, world: int):
    """(ring err, one-process err, None or what failed) on the reduced case, max over ranks and outputs. The bound
    per output: 2x (out) or 3x (dq, dk, dv) one-process attention's error + 1e-5; in bf16 the gradients' bound
    adds W roundings of the per-step partials (W * 2^-8 * max |grad|): each block's backward returns its dq/dk/dv
    partial in the input dtype, which the ring then sums in float32 (one process rounds once)."""
    import torch.distributed as dist

    from .. import api
    from .. import distributed as fd
    from ..reference import attention_ref

    causal, bwd = case["causal"], case["mode"] == "fwd+bwd"
    q, k, v, dout = _inputs(case, min(case["L"], CHECK_L), 2, seed=1)
    ref = _run(
        lambda a, b, c: attention_ref(a, b, c, causal=causal, compute_dtype=torch.float64),
        *(t.double() for t in (q, k, v)),
        dout.double() if bwd else None,
    )
    one = _run(lambda a, b, c: api.attention(a, b, c, causal=causal, backend="cpu"), q, k, v, dout if bwd else None)

    def sh(t):
        return fd.shard(t, rank, world, dim=2, zigzag=causal)

    ring = _run(
        lambda a, b, c: fd.ring_attention(a, b, c, causal=causal, zigzag=causal, backend="cpu"),
        *(sh(t) for t in (q, k, v)),
        sh(dout) if bwd else None,
    )
    unit = 2.0**-8 if case["dtype"] == "bf16" else 0.0  # bf16's unit roundoff (8 significant bits)
    rows = []  # per output: ring err, one-process err, bound
    for i, (r, o, f) in enumerate(zip(ring, one, ref)):
        ring_err, one_err = (r.double() - sh(f)).abs().max().item(), (sh(o).double() - sh(f)).abs().max().item()
        bound = (2 if i == 0 else 3) * one_err + 1e-5 + (0.0 if i == 0 else world * unit * f.abs().max().item())
        rows.append([ring_err, one_err, bound])
    errs = torch.tensor(rows, dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)  # ring err and bound: the worst rank's (bounds: the loosest)
    fails = torch.tensor([float(e[0] > e[2]) for e in rows])
    dist.all_reduce(fails, op=dist.ReduceOp.MAX)
    bad = [
        f"{n} err {errs[i, 0].item():.1e} > bound {errs[i, 2].item():.1e}"
        for i, n in enumerate(("out", "dq", "dk", "dv")[: len(rows)])
        if fails[i] > 0
    ]
    return errs[:, 0].max().item(), errs[0, 1].item(), "; ".join(bad) or None


def _measure(case: dict, rank: int, world: int, threads: int, reps: int) -> dict:
    """Times (ms, the slowest rank's per call) of ring / compute_only / one_process, and the ring's wait shares."""
    import torch.distributed as dist

    from .. import api
    from .. import distributed as fd

    causal, bwd = case["causal"], case["mode"] == "fwd+bwd"
    q, k, v, dout = _inputs(case, case["L"], case["H"], seed=0)
    qs, ks, vs, ds = (fd.shard(t, rank, world, dim=2, zigzag=causal) for t in (q, k, v, dout))
    if rank != 0:
        del q, k, v, dout

    def ring():
        _run(lambda a, b, c: fd.ring_attention(a, b, c, causal=causal, zigzag=causal), qs, ks, vs, ds if bwd else None)

    def compute_only():
        with _compute_only():
            ring()

    def one_process():
        if rank == 0:
            torch.set_num_threads(threads * world)
            try:
                _run(lambda a, b, c: api.attention(a, b, c, causal=causal), q, k, v, dout if bwd else None)
            finally:
                torch.set_num_threads(threads)

    def transfer_only():
        """The ring's exchanges alone, step by step as the ring starts them: K/V W-1 times (forward); for fwd+bwd
        then the backward's K/V W-1 times beside its float32 dK/dV accumulators W times."""
        ring = fd._Ring(None)
        kv = (ks, vs)
        steps = [(kv, None)] * (world - 1)
        if bwd:
            dkv = (torch.zeros(ks.shape, dtype=torch.float32), torch.zeros(vs.shape, dtype=torch.float32))
            steps += [(kv, dkv)] * (world - 1) + [(None, dkv)]
        for blocks, accs in steps:
            reqs = []
            if blocks is not None:
                reqs += ring.exchange(blocks, fd._KV_TAG)[1]
            if accs is not None:
                reqs += ring.exchange(accs, fd._DKV_TAG)[1]
            ring.wait(reqs)

    fns = {"ring": ring, "compute_only": compute_only, "transfer_only": transfer_only, "one_process": one_process}
    times = {n: [] for n in fns}
    waits = []

    def timed(n, record: bool):
        dist.barrier()
        fd._timing = {} if n == "ring" else None
        t0 = time.perf_counter()
        fns[n]()
        dt = time.perf_counter() - t0
        wait = fd._timing.get("wait_s", 0.0) if n == "ring" else 0.0
        fd._timing = None
        both = torch.tensor([[dt, wait]], dtype=torch.float64)
        gathered = [torch.zeros_like(both) for _ in range(world)]
        dist.all_gather(gathered, both)
        per_rank = torch.cat(gathered)  # (W, 2): seconds, wait seconds
        if record:
            slowest = per_rank[0, 0].item() if n == "one_process" else per_rank[:, 0].max().item()
            times[n].append(slowest * 1e3)
            if n == "ring":
                waits.append((per_rank[:, 1] / slowest).mean().item())

    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for n in fns:
            timed(n, record=False)  # warm-up
        for order in round_orders(list(fns), reps):
            for n in order:
                timed(n, record=True)
    finally:
        if gc_was_on:
            gc.enable()
    return {"times": times, "wait_share": statistics.median(waits)}


def _stats(t: list) -> dict:
    return dict(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t))


def _rows_for(case: dict, rank: int, world: int, threads: int, default_repeats: int) -> list[Row]:
    ring = Row(name, case, "fusedattn", "ok", metric_name=metric_name)
    one = Row(name, case, "one_process", "ok", metric_name=metric_name)
    try:
        ring_err, one_err, bad = _check(case, rank, world)
        ring.max_err, one.max_err = ring_err, one_err
        if bad:
            ring.status = f"WRONG ({bad})"
        one_tol = 1e-4 if case["dtype"] == "fp32" else 3e-2
        if not one_err <= one_tol:
            one.status = f"WRONG (err {one_err:.1e} > {one_tol:.1e})"
        if ring.status != "ok":
            if one.status == "ok":
                one.status = "not timed (the ring failed its check)"
            return [ring, one]
        m = _measure(case, rank, world, threads, repeats(case, default_repeats))
    except Exception as e:  # noqa: BLE001 (reported in the table; the other ranks fail with it)
        msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        ring.status = one.status = msg
        return [ring, one]
    for row, key in ((ring, "ring"), (one, "one_process")):
        if row.status != "ok":
            continue
        for k, val in _stats(m["times"][key]).items():
            setattr(row, k, val)
        row.metric = work(case) / (row.median_ms * 1e-3) / 1e9
    comp, transfer = (statistics.median(m["times"][k]) for k in ("compute_only", "transfer_only"))
    ring.extra = {
        "compute_only_ms": comp,
        "transfer_only_ms": transfer,
        "transfer_share": transfer / ring.median_ms,
        "comm_share": (ring.median_ms - comp) / ring.median_ms,
        "wait_share": m["wait_share"],
    }
    return [ring, one]


def _worker(rank: int, world: int, port: int, todo: list, opts: dict, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(opts["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows: list[Row] = []
    try:
        for case in todo:
            flag = [opts["deadline"] is not None and time.monotonic() >= opts["deadline"]]
            dist.broadcast_object_list(flag, src=0)  # rank 0's clock decides, so every rank runs the same cases
            if flag[0]:
                case_rows = [
                    Row(name, case, b, TIME_CAP, metric_name=metric_name) for b in ("fusedattn", "one_process")
                ]
            else:
                case_rows = _rows_for(case, rank, world, opts["threads"], opts["repeats"])
            rows += case_rows
            if rank == 0:
                for r in case_rows:
                    print(format_row(r, rows), flush=True)
                    # written after every case: a world that dies later still leaves the rows it measured
                with open(out_path, "w") as f:
                    json.dump([asdict(r) for r in rows], f)
            if any(r.status.startswith("error") for r in case_rows):
                raise RuntimeError(f"{case}: {case_rows[0].status}")  # the ranks may be out of step: end the world
        dist.barrier()
    except Exception:
        if rank == 0:
            traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_family(
    *,
    device: str,
    dtypes: Optional[list[str]],
    quick: bool,
    repeats: int,
    out_dir: Optional[str],
    where=(),
    deadline: Optional[float] = None,
    write: bool = True,
    world_size: int = 2,
    **_ignored,
) -> list[Row]:
    """Spawns a world of ``world_size`` gloo processes, measures every case there (those ``where`` selects; a
    case not started by ``deadline`` is listed as skipped) and returns the rows; ``write``: the family's
    <device>_distributed[_quick].{md,csv,json,png} in ``out_dir``. The bench CLI's engine for this family, in
    place of core.run_family (which times callables in one process)."""
    import torch.multiprocessing as mp

    if world_size < 2:
        raise ValueError(f"--world-size must be at least 2 (a ring), got {world_size}")
    threads = max(1, torch.get_num_threads() // world_size)
    info = dict(machine_info(device), world_size=world_size, threads_per_rank=threads)
    all_cases = select_cases(cases(quick=quick, device=device, dtypes=dtypes, world_size=world_size), name, where)
    if device != "cpu":
        why = "absent: the distributed family runs CPU processes over gloo (NCCL would need one GPU per rank)"
        rows = [Row(name, {k: "-" for k in (all_cases[0] if all_cases else {})}, "fusedattn", why)]
    else:
        opts = {"threads": threads, "repeats": repeats, "deadline": deadline}
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "rows.json")
            error = None
            try:
                mp.spawn(
                    _worker, args=(world_size, _free_port(), all_cases, opts, out_path), nprocs=world_size, join=True
                )
            except Exception as e:  # a rank failed: its case is an error row, the cases after it are not run
                error = f"error: world ended: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            done = []
            if os.path.exists(out_path):
                with open(out_path) as f:
                    done = [Row(**r) for r in json.load(f)]
        seen = [r.case for r in done]
        rows = done + [
            Row(name, c, b, error or "error: no result", metric_name=metric_name)
            for c in all_cases
            if c not in seen
            for b in ("fusedattn", "one_process")
        ]
    if out_dir and write:
        tag = f"{device}_{name}" + ("_quick" if quick else "")
        for p in write_results(rows, sys.modules[__name__], info, out_dir, tag):
            print(f"wrote {p}")
    return rows
