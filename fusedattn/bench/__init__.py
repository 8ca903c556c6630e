"""Benchmarks: ``python -m fusedattn bench [FAMILY ...] [--device] [--dtype] [--quick] [--where] [--time-cap]
[--out DIR [--bundle NAME]]``; FAMILY is attention, decode, model, hf or all (the default).

Each family module (``attention.py``, ``decode.py``, ``model.py``) names its cases, its peers, its correctness
check and its FLOP/byte formula; ``core.py`` holds the method: timing, memory, tables, CSV/JSON
and plots.

    python -m fusedattn bench attention --where D=64,128 --where L=1024,16384   # a subset of the cases
    python -m fusedattn bench decode attention --where decode:B=64 --time-cap 150 --out OUT --bundle bench

``distributed`` (ring attention over W CPU processes on gloo, ``--world-size W``, default 2, vs one-process
attention at the same total length, and the communication share) spawns its own processes and takes
minutes (~5 on 2 loaded cores): ``all`` leaves it out, name it. ``features`` (each optional feature -- sinks,
rotary in the decode append, cache_leftpad -- against the same kernel without it, same run) is left out of
``all`` too.

``--where [FAMILY:]KEY=V1,V2`` keeps the cases whose KEY is one of the values (repeatable; without FAMILY it
applies to every family run). ``--time-cap S``: cases (and backends) not started within S seconds of the
start are listed as "skipped (time cap)", so the run ends with its tables. ``--bundle NAME``: all families in
OUT/NAME.{md,json,csv} plus one <device>_<family>.png each, instead of four files per family. Exit status 1
when a fusedattn backend is absent, WRONG or raised (a peer's failure is only reported).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from . import attention, decode, distributed, features, hf, model
from .core import machine_info, parse_where, run_family, write_bundle

FAMILIES = {fam.name: fam for fam in (attention, decode, model, hf, features, distributed)}
IN_ALL = [n for n, fam in FAMILIES.items() if getattr(fam, "in_all", True)]  # `all`: not distributed (slow)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m fusedattn bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "family", nargs="*", default=["all"], help=f"{', '.join(FAMILIES)} or all (the default: {', '.join(IN_ALL)})"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype",
        action="append",
        choices=["fp32", "bf16", "fp16"],
        help="repeatable; default: fp32+bf16 on the CPU, bf16+fp16 on CUDA",
    )
    ap.add_argument("--quick", action="store_true", help="a small subset (under a minute on a 2-core CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    ap.add_argument(
        "--where",
        action="append",
        metavar="[FAMILY:]KEY=V1,V2",
        help="keep only the cases whose KEY is one of the values (repeatable)",
    )
    ap.add_argument(
        "--time-cap",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no case or backend later than this after the start (they are listed as skipped)",
    )
    ap.add_argument("--out", default=None, help="write <device>_<family>.{md,csv,json,png} here")
    ap.add_argument(
        "--bundle",
        default=None,
        metavar="NAME",
        help="with --out: every family in NAME.{md,json,csv} + <device>_<family>.png",
    )
    ap.add_argument(
        "--world-size", type=int, default=2, metavar="W", help="distributed: the ring's processes (default 2)"
    )
    args = ap.parse_args(argv)
    names = [*IN_ALL, *(n for n in args.family if n != "all")] if "all" in args.family else args.family
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {', '.join(unknown)} (choose from {', '.join(FAMILIES)} or all)")
    if args.bundle and not args.out:
        ap.error("--bundle needs --out")
    try:
        where = parse_where(args.where)
    except ValueError as e:
        ap.error(str(e))
    bad = [f for f, _, _ in where if f is not None and f not in FAMILIES]
    if bad:
        ap.error(f"--where names unknown family {', '.join(bad)}")
    deadline = None if args.time_cap is None else time.monotonic() + args.time_cap

    info = machine_info(args.device)
    print(json.dumps(info))
    results = []
    for name in dict.fromkeys(names):
        fam = FAMILIES[name]
        # a family that runs in processes of its own (distributed) brings its engine
        own = getattr(fam, "run_family", None)
        engine = own or functools.partial(run_family, fam)
        extra = {"world_size": args.world_size} if own else {}
        rows = engine(
            device=args.device,
            dtypes=args.dtype,
            quick=args.quick,
            repeats=args.repeats,
            memory=not args.no_memory and not args.quick,
            out_dir=args.out,
            where=where,
            deadline=deadline,
            write=not args.bundle,
            **extra,
        )
        results.append((fam, rows, info))
    if args.bundle:
        for p in write_bundle(results, args.out, args.bundle, args.device):
            print(f"wrote {p}")
    # the exit status: 1 when one of our kernels is missing, wrong or raised (a peer's failure is only reported)
    bad = [
        f"{fam.name}/{r.backend}: {r.status}"
        for fam, rows, _ in results
        for r in rows
        if r.backend.startswith("fusedattn") and r.status.startswith(("absent", "WRONG", "error"))
    ]
    if bad:
        print(f"bench: {len(bad)} fusedattn rows absent, wrong or failed:\n  " + "\n  ".join(bad[:20]))
        raise SystemExit(1)
