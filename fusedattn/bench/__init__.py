"""Benchmarks: ``python -m fusedattn bench [attention|decode|model|all] [--device] [--dtype] [--quick] [--out DIR]``.

Each family module (``attention.py``, ``decode.py``, ``model.py``) names its cases, its peers, its correctness
check and its FLOP/byte formula; ``core.py`` holds the method: timing, memory, tables, CSV/JSON
and plots.
"""
from __future__ import annotations

import argparse

import torch

from . import attention, decode, model
from .core import machine_info, run_family

FAMILIES = {fam.name: fam for fam in (attention, decode, model)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fusedattn bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", nargs="?", default="all", choices=[*FAMILIES, "all"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"],
                    help="repeatable; default: fp32+bf16 on the CPU, bf16+fp16 on CUDA")
    ap.add_argument("--quick", action="store_true", help="a small subset (under a minute on a 2-core CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    ap.add_argument("--out", default=None, help="write <device>_<family>.{md,csv,json,png} here")
    args = ap.parse_args(argv)
    import json

    print(json.dumps(machine_info(args.device)))
    for fam in (FAMILIES.values() if args.family == "all" else [FAMILIES[args.family]]):
        run_family(fam, device=args.device, dtypes=args.dtype, quick=args.quick, repeats=args.repeats,
                   memory=not args.no_memory and not args.quick, out_dir=args.out)
