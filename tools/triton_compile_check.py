"""Compile every Triton kernel of fusedattn for real GPU targets (sm_90, sm_80) on a machine without a GPU.

Usage:
    /root/.cache/fusedattn/venv-cp312-torch2.11.0/bin/python tools/triton_compile_check.py [--arch 90 80] [--jobs 2]
        [--source ROOT | --installed] [--quick] [--list] [--cache-dir DIR] [-v]

Why: the tests run the kernels through Triton's interpreter (TRITON_INTERPRET=1), which accepts code that the
compiler rejects (type mismatches in tl.where / tl.dot, non-constexpr globals, bad layouts, shared memory). This
script compiles them, down to cubins, with the Triton the GPU machine runs (3.6, in the cp312 venv), and exits 1
on any compile error.

How (nothing here knows a kernel's signature, so the kernels can be refactored freely):
  1. The kernel modules are imported with TRITON_INTERPRET unset, i.e. as on a GPU (autotuned kernels,
     ``torch.library.triton_op`` registration, no UPCAST). Nothing in them needs a device at import time; if a
     module ever asks ``torch.cuda.is_available()`` it gets the truth (False) -- the script does not patch it.
  2. ``JITFunction.run`` and ``Autotuner.run`` are replaced by capturing versions, and the real torch ops
     (``torch.ops.fusedattn.triton_attention_fwd`` / ``_bwd``, ``triton_varlen_fwd`` / ``_bwd``,
     ``triton_decode_fwd``, ``triton_merge_attention_states``) are called with small CPU tensors for every case
     in CASES below. Each launch is bound exactly as triton's JIT binds it -- ``create_function_from_signature``
     (the JIT's own binder, so ints equal to 1 become constexprs, 16-divisible ints / pointers get
     ``tt.divisibility``) and ``JITFunction._pack_args`` -- but with the *target's* backend, so signature,
     constexprs, specialization attrs and options are what the GPU would compile. CPU tensors have the same
     strides as the GPU ones and 16-byte-aligned data, so the specialization matches.
  3. An autotuned launch expands into every config that survives the autotuner's own pruning
     (``Autotuner.prune_configs``; the kernels' shared-memory pruning happens when they build the autotuners).
  4. Identical (target, kernel, signature, constexprs, attrs, options) keys are compiled once, by ``--jobs``
     forked workers, with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; a cubin of size
     0 counts as a failure.
  5. Shared memory: a config whose compiled kernel needs more than the target allows (sm_90 227 KiB, sm_80
     163 KiB per block, opt-in maximum) cannot load there. The autotuner skips such a config (OutOfResources is a
     benchmarking result, not an error), so it is reported, not failed -- unless *every* config of one launch is
     over the limit (the kernel could not run at all on that GPU): that fails.

Which modules: by default the source tree's (``--source``, default the checkout this file is in): the kernels
being tested are the working copy, not whatever wheel is installed. ``fusedattn`` is imported from ROOT/fusedattn
(it imports fine without its compiled extension: _ops.py tolerates a missing _C), and a small import hook maps
``fusedattn.kernels`` (and its submodules, e.g. kernels/_common.py) to ROOT/kernels, as setup.py's package_dir
does. ``--installed`` imports the installed package instead (a wheel in the venv).

The case grid (what the dispatcher sends to Triton: any head dim, padded to a power of two >= 16; fp16 / bf16 /
fp32; see cases()). Every constexpr combination would be thousands of compiles, and compile time, not the grid,
is the limit on 2 cores (fp32 kernels take ~10x longer than fp16: ieee dots unroll into FMAs), so:
  1. every autotune config that survives pruning, per (head-dim bucket, element size) -- the pruning depends on
     nothing else: fp16 and fp32 at D = 64, 128, 256 (each bucket's largest tile), baseline flags (causal, GQA,
     dense), forward + backward; fp16 for both targets, fp32 every config for sm_80 and one for sm_90. fp32 runs
     ``tl.dot(..., input_precision="ieee")``, which lowers to FMAs on both targets (no MMA / wgmma), so the code
     is the same but for the limits, and sm_80's are the smaller (163 vs 227 KiB of shared memory); an fp32
     compile costs ~9 CPU-s at BLOCK_D 128 / 256 (fp16 ~0.8), so this halves the run;
  2. bf16 and the other head dims (32: BLOCK_D 32; 72: not a multiple of 16, so no divisibility attrs; Dv != D,
     192 / 128; fp16 / bf16 only but for 32) with one config per launch, rotating through the configs (80 / 96 pad
     to 128 and are 16-divisible: the same compiled kernel as 128);
  3. the flags, pairwise (every pair of values of two factors appears in some case), fp16 / bf16, one config per
     launch: causal / sliding window / full / left-only window, bottom-right / top-left, softcap, no / bool /
     additive mask, GQA (GROUP 1 is a constexpr after specialization), varlen, grad_lse; fp32 gets two all-flags
     cases; Lq = 1 (also a constexpr) once;
  4. decode, pairwise: contiguous / paged / cache_batch_idx, append (Lnew 0 / 1 / 3), splits 1 / 4 (+ combine),
     softcap, GQA 1 / 4 / 8, Lq 1 / 4, window, dtypes, head dims 64 / 128 / 256 / 72 / (192, 128); and
     merge_attention_states.
Sequence lengths and batch sizes only change runtime ints (beyond the ==1 / 16-divisible specializations, which
the cases cover), so they are not varied. ``--quick`` is fp16 with one config per launch (the pytest wrapper).

Cost (2026-12-03, triton 3.6, cold cache, this 2-core machine shared with other jobs at load 8-50): the superset
grid before the fp32 cut above -- 446 compiles -- passed in 877 CPU-s (32 min of wall under that load); this grid
is 416 compiles, ~650 CPU-s: ~5.5 min with --jobs 2 on 2 idle cores (the summary line prints the CPU-s and that
estimate). fp32 attention is a fifth of the compiles and two thirds of the time. CI can keep ``--cache-dir``
between runs (key it on the triton version): kernels whose source did not change are then cache hits.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # compile as on a GPU: must happen before triton is imported

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = os.path.dirname(HERE)

# Per-block shared memory (opt-in maximum, bytes): cudaDevAttrMaxSharedMemoryPerBlockOptin.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}


# ------------------------------------------------------------------------------------------------
# importing the kernels from the source tree
# ------------------------------------------------------------------------------------------------
class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Resolves fusedattn.kernels / fusedattn.transformer to ROOT/kernels, ROOT/transformer (setup.py's
    package_dir); their submodules are then found through the package's __path__ as usual."""

    def __init__(self, root):
        self.map = {
            "fusedattn.kernels": os.path.join(root, "kernels"),
            "fusedattn.transformer": os.path.join(root, "transformer"),
        }

    def find_spec(self, name, path=None, target=None):
        d = self.map.get(name)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(d, "__init__.py"), submodule_search_locations=[d]
        )


def import_kernels(root):
    """Imports fusedattn (from ROOT, or installed when root is None) and the Triton kernel modules."""
    if root is not None:
        root = os.path.abspath(root)
        sys.path.insert(0, root)
        sys.meta_path.insert(0, _SourceTreeFinder(root))
    import fusedattn  # noqa: F401
    from fusedattn import kernels

    mods = {}
    for name in ("attention", "decode"):
        mods[name] = importlib.import_module(f"fusedattn.kernels.{name}")
    where = os.path.dirname(os.path.abspath(kernels.__file__))
    return mods, where


# ------------------------------------------------------------------------------------------------
# capturing launches
# ------------------------------------------------------------------------------------------------
@dataclass
class Job:
    arch: int
    kernel: str  # module:name
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str  # the autotune config (or "-")
    cases: list = field(default_factory=list)
    groups: set = field(default_factory=set)  # autotuned launches this job is one config of


class Capture:
    def __init__(self, archs):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.targets = {a: GPUTarget("cuda", a, 32) for a in archs}
        self.backends = {a: make_backend(t) for a, t in self.targets.items()}
        self.binders = {}
        self.jobs = {}  # key -> Job
        self.groups = {}  # (arch, group id) -> [job keys]
        self.case = "?"
        self.config = None  # (group id, label) inside an autotuned launch
        # True: every config of an autotuned launch for every target; "fp32": every config for one target (sm_80
        # if asked for), one config for the others; False: one config per launch, rotating (see cases())
        self.all_configs = True
        self.full_groups = set()  # (arch, group id) whose every surviving config was compiled
        self.archs = None  # the targets the launch being captured is compiled for (None: all)
        self.n_group = 0
        self.n_launches = 0

    def jit_run(self, fn, args, kwargs):
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs)
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        self.n_launches += 1
        for arch, backend in self.backends.items():
            if self.archs is not None and arch not in self.archs:
                continue
            bkey = (id(fn), arch)
            if bkey not in self.binders:
                self.binders[bkey] = create_function_from_signature(fn.signature, fn.params, backend)
            bound_args, specialization, options = self.binders[bkey](*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
            name = f"{fn.module.rsplit('.', 1)[-1]}:{fn.__name__}"
            key = (
                arch,
                name,
                repr(sorted(signature.items())),
                repr(sorted(constexprs.items(), key=str)),
                repr(sorted(attrs.items(), key=str)),
                repr(options),
            )
            job = self.jobs.get(key)
            if job is None:
                cfg = self.config[1] if self.config else "-"
                job = self.jobs[key] = Job(arch, name, fn, signature, constexprs, attrs, options.__dict__, cfg)
            job.cases.append(self.case)
            if self.config:
                gid = self.config[0]
                job.groups.add(gid)
                self.groups.setdefault((arch, gid), []).append(key)

    def autotune_run(self, tuner, args, kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
        self.n_group += 1
        targets = set(self.backends)
        if self.all_configs is True:
            full = targets
        elif self.all_configs:
            full = {80} if 80 in targets else {min(targets)}
        else:
            full = set()
        self.full_groups.update((a, self.n_group) for a in full)
        pick = configs[self.n_group % len(configs)]  # the one config the other targets get
        try:
            for cfg in configs:
                self.archs = targets if cfg is pick else full
                if not self.archs:
                    continue
                self.config = (self.n_group, _cfg_label(cfg))
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
        finally:
            self.config = None
            self.archs = None
            tuner.nargs = None

    def install(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        cap = self

        def jit_run(self, *args, **kwargs):
            return cap.jit_run(self, args, kwargs)

        def autotune_run(self, *args, **kwargs):
            return cap.autotune_run(self, args, kwargs)

        JITFunction.run = jit_run
        Autotuner.run = autotune_run


def _cfg_label(cfg):
    kw = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{kw},w{cfg.num_warps},s{cfg.num_stages}"


# ------------------------------------------------------------------------------------------------
# cases: small CPU tensors through the real torch ops
# ------------------------------------------------------------------------------------------------
def _dtypes():
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_case(
    dt,
    D,
    Dv,
    causal=True,
    window=None,
    bottom_right=True,
    softcap=0.0,
    mask=None,
    group=2,
    Lq=33,
    Lk=47,
    varlen=False,
    grad_lse=False,
    bwd=True,
):
    """Dense (B, H, L, D) or varlen (total, H, D) attention forward (+ backward) through the torch ops.
    mask: None, "bool" or "add" (additive, q's dtype); window: (left, right) or None (causal sets right = 0)."""
    import torch

    dtype = _dtypes()[dt]
    Hkv = 2
    Hq = Hkv * group
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    scale = D**-0.5
    ops = torch.ops.fusedattn
    if varlen:
        lens_q, lens_k = [Lq, 5, 1], [Lk, 9, 3]
        cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32)
        cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32)
        q = torch.randn(sum(lens_q), Hq, D, dtype=dtype)
        k = torch.randn(sum(lens_k), Hkv, D, dtype=dtype)
        v = torch.randn(sum(lens_k), Hkv, Dv, dtype=dtype)
        out, lse = ops.triton_varlen_fwd(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), scale, left, right, softcap)
        if bwd:
            out, lse = torch.randn(out.shape, dtype=dtype), torch.randn(lse.shape)
            glse = torch.randn(lse.shape) if grad_lse else None
            ops.triton_varlen_bwd(
                torch.randn(out.shape, dtype=dtype),
                q,
                k,
                v,
                out,
                lse,
                cu_q,
                cu_k,
                max(lens_q),
                max(lens_k),
                scale,
                left,
                right,
                softcap,
                glse,
            )
        return
    B = 2
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=dtype)
    m = None
    if mask == "bool":
        m = torch.rand(Lq, Lk) > 0.2
    elif mask == "add":
        m = torch.randn(B, 1, Lq, Lk, dtype=dtype)
    out, lse = ops.triton_attention_fwd(q, k, v, m, scale, left, right, bottom_right, softcap)
    if bwd:
        out, lse = torch.randn(out.shape, dtype=dtype), torch.randn(lse.shape)
        glse = torch.randn(lse.shape) if grad_lse else None
        ops.triton_attention_bwd(
            torch.randn(out.shape, dtype=dtype), q, k, v, out, lse, m, scale, left, right, bottom_right, softcap, glse
        )


def decode_case(dt, D, Dv, group=4, Lq=1, paged=False, cbi=False, Lnew=0, softcap=0.0, window=(-1, -1), splits=1):
    """Decode through torch.ops.fusedattn.triton_decode_fwd: cache (B_cache, L_max, Hkv, D) or paged
    (num_blocks, PAGE_SIZE, Hkv, D); splits > 1 adds the combine kernel."""
    import torch

    dtype = _dtypes()[dt]
    B, Hkv = 2, 2
    Hq = Hkv * group
    q = torch.randn(B, Lq, Hq, D, dtype=dtype)
    seqlens = torch.tensor([37, 90], dtype=torch.int32)
    bt = cbi_t = None
    if paged:
        page, blocks = 16, 8
        kc = torch.zeros(2 * blocks, page, Hkv, D, dtype=dtype)
        vc = torch.zeros(2 * blocks, page, Hkv, Dv, dtype=dtype)
        bt = torch.randperm(2 * blocks, dtype=torch.int32).reshape(B, blocks).contiguous()
    else:
        kc = torch.zeros(B + 1, 128, Hkv, D, dtype=dtype)
        vc = torch.zeros(B + 1, 128, Hkv, Dv, dtype=dtype)
        if cbi:
            cbi_t = torch.tensor([2, 0], dtype=torch.int32)
    kn = vn = None
    if Lnew:
        kn = torch.randn(B, Lnew, Hkv, D, dtype=dtype)
        vn = torch.randn(B, Lnew, Hkv, Dv, dtype=dtype)
    torch.ops.fusedattn.triton_decode_fwd(
        q, kc, vc, seqlens, kn, vn, bt, cbi_t, D**-0.5, window[0], window[1], softcap, splits
    )


def merge_case(dt, D, L=3, H=4):
    import torch

    dtype = _dtypes()[dt]
    B = 2
    oa, ob = torch.randn(B, L, H, D, dtype=dtype), torch.randn(B, L, H, D, dtype=dtype)
    la, lb = torch.randn(B, H, L), torch.randn(B, H, L)
    torch.ops.fusedattn.triton_merge_attention_states(oa, la, ob, lb)


def _pairwise(factors):
    """A small set of assignments covering every pair of values of every two factors (greedy)."""
    names = list(factors)
    uncovered = set()
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        for va in range(len(factors[a])):
            for vb in range(len(factors[b])):
                uncovered.add((i, va, j, vb))
    rows = []
    full = list(itertools.product(*[range(len(factors[n])) for n in names]))
    while uncovered:
        best, best_n = None, -1
        for row in full:
            n = sum((i, row[i], j, row[j]) in uncovered for i, j in itertools.combinations(range(len(names)), 2))
            if n > best_n:
                best, best_n = row, n
        rows.append(best)
        for i, j in itertools.combinations(range(len(names)), 2):
            uncovered.discard((i, best[i], j, best[j]))
    return [{n: factors[n][v] for n, v in zip(names, row)} for row in rows]


HEAD_DIMS_ALL_CONFIGS = [(64, 64), (128, 128), (256, 256)]  # the largest tile of each head-dim bucket
# BLOCK_D 32 (bucket 64's smaller tile); not a multiple of 16 (no divisibility attrs: other masks / vector widths);
# Dv != D (MLA-style). 80 / 96 are multiples of 16 and pad to 128: the same compiled kernel as D = 128.
HEAD_DIMS_EXTRA = [(32, 32), (72, 72), (192, 128)]


def cases(quick=False):
    """(label, callable, all_configs) triples; all_configs=False compiles one config per autotuned launch
    (rotating through them). See the module docstring for why this grid."""
    dts = ["fp16"] if quick else ["fp16", "bf16", "fp32"]
    out = []
    # 1. every autotune config that survives pruning, per (head-dim bucket, element size): fp16 and fp32 (the
    #    pruning depends on the element size only) at each bucket's largest tile, baseline flags (causal, GQA,
    #    dense), forward + backward. bf16 (fp16's configs and tiles, another element type) and the other head dims
    #    rotate through the configs.
    for dt in dts:
        for D, Dv in HEAD_DIMS_ALL_CONFIGS + ([] if quick else HEAD_DIMS_EXTRA):
            if dt == "fp32" and (D, Dv) in ((192, 128), (72, 72)):
                continue  # fp32 at BLOCK_D 128 / 256 costs ~9 CPU-s a compile; fp16 / bf16 cover these head dims
            every = dt != "bf16" and (D, Dv) in HEAD_DIMS_ALL_CONFIGS and not quick
            if every and dt == "fp32":
                every = "fp32"  # every config on sm_80 only (see the module docstring)
            out.append(
                (f"attn {dt} D={D} Dv={Dv} causal gqa", lambda dt=dt, D=D, Dv=Dv: attention_case(dt, D, Dv), every)
            )
    # 2. the flags, pairwise (each pair of values of two factors appears in some case), one config per launch.
    #    fp16 / bf16 only: they are where mixed-type code (masks, P and dS casts) can fail; fp32 compiles are ~10x
    #    slower (no tensor cores: ieee dots unroll into FMAs), so fp32 gets the two all-flags cases below.
    factors = {
        "dt": [d for d in dts if d != "fp32"],
        "hd": [(64, 64), (128, 128)],
        "mode": ["causal", "window", "full", "local"],
        "bottom_right": [True, False],
        "softcap": [0.0, 30.0],
        "mask": [None, "bool", "add"],
        "group": [1, 3],
        "varlen": [False, True],
        "grad_lse": [False, True],
    }
    for row in _pairwise(factors):
        if row["varlen"] and (row["mask"] is not None or not row["bottom_right"]):
            row = dict(row, mask=None, bottom_right=True)  # varlen: no mask, always bottom-right
        causal = row["mode"] == "causal"
        window = {"causal": None, "window": (5, 3), "full": None, "local": (7, 0)}[row["mode"]]
        D, Dv = row["hd"]
        label = (
            f"attn {row['dt']} D={D} Dv={Dv} {row['mode']} br={row['bottom_right']} softcap={row['softcap']} "
            f"mask={row['mask']} group={row['group']} varlen={row['varlen']} grad_lse={row['grad_lse']}"
        )
        out.append(
            (
                label,
                lambda row=row, causal=causal, window=window, D=D, Dv=Dv: attention_case(
                    row["dt"],
                    D,
                    Dv,
                    causal=causal,
                    window=window,
                    bottom_right=row["bottom_right"],
                    softcap=row["softcap"],
                    mask=row["mask"],
                    group=row["group"],
                    varlen=row["varlen"],
                    grad_lse=row["grad_lse"],
                ),
                False,
            )
        )
    if "fp32" in dts:
        out.append(
            (
                "attn fp32 D=64 Dv=64 window br=False softcap=30 mask=add group=1 grad_lse",
                lambda: attention_case(
                    "fp32",
                    64,
                    64,
                    causal=False,
                    window=(5, 3),
                    bottom_right=False,
                    softcap=30.0,
                    mask="add",
                    group=1,
                    grad_lse=True,
                ),
                False,
            )
        )
        out.append(
            (
                "attn fp32 D=64 Dv=64 local softcap=30 group=3 varlen grad_lse",
                lambda: attention_case(
                    "fp32", 64, 64, causal=False, window=(7, 0), softcap=30.0, group=3, varlen=True, grad_lse=True
                ),
                False,
            )
        )
    # Lq = 1 (an int equal to 1 is a constexpr after specialization: a variant of its own)
    out.append(("attn fp16 D=128 Lq=1", lambda: attention_case("fp16", 128, 128, causal=True, Lq=1), False))
    # 3. decode (no autotuning): contiguous / paged / cache_batch_idx x append x splits (+ combine) x softcap x
    #    GQA x Lq x window, pairwise
    dfactors = {
        "dt": dts,
        "hd": [(64, 64), (128, 128), (256, 256), (72, 72), (192, 128)] if not quick else [(128, 128)],
        "layout": ["contig", "paged", "cbi"],
        "Lnew": [0, 1, 3],
        "splits": [1, 4],
        "softcap": [0.0, 30.0],
        "group": [1, 4, 8],
        "Lq": [1, 4],
        "window": [(-1, -1), (64, 0)],
    }
    for row in _pairwise(dfactors):
        D, Dv = row["hd"]
        label = (
            f"decode {row['dt']} D={D} Dv={Dv} {row['layout']} Lnew={row['Lnew']} splits={row['splits']} "
            f"softcap={row['softcap']} group={row['group']} Lq={row['Lq']} window={row['window']}"
        )
        out.append(
            (
                label,
                lambda row=row, D=D, Dv=Dv: decode_case(
                    row["dt"],
                    D,
                    Dv,
                    group=row["group"],
                    Lq=row["Lq"],
                    paged=row["layout"] == "paged",
                    cbi=row["layout"] == "cbi",
                    Lnew=row["Lnew"],
                    softcap=row["softcap"],
                    window=row["window"],
                    splits=row["splits"],
                ),
                True,
            )
        )
    # 4. merge_attention_states (the combine kernel on two states)
    for dt in dts:
        for D in (64, 128, 256, 72):
            out.append((f"merge {dt} D={D}", lambda dt=dt, D=D: merge_case(dt, D), True))
    return out


# ------------------------------------------------------------------------------------------------
# compiling
# ------------------------------------------------------------------------------------------------
_JOBS = []  # filled before the workers fork


def _resources(cubin):
    """(registers, stack bytes) per thread from cuobjdump (a stack frame > 0 means register spills); None, None
    when cuobjdump is unavailable."""
    import re
    import subprocess

    try:
        from triton import knobs

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run(
                [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            ).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", text)
        return (int(m.group(1)), int(m.group(2))) if m else (None, None)
    except Exception:  # noqa: BLE001  (resource usage is a note: never fail the check over it)
        return None, None


def _compile(i):
    """Compiles job i; returns (i, ok, error, seconds, cubin bytes, shared bytes, registers, stack bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[i]
    t0 = time.time()
    c0 = _cpu()
    try:
        src = ASTSource(fn=job.fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        k = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        cubin = k.asm.get("cubin", b"")
        if not cubin:
            return i, False, "no cubin produced (empty)", time.time() - t0, 0, 0, None, None, _cpu() - c0
        regs, stack = _resources(cubin)
        return i, True, "", time.time() - t0, len(cubin), int(k.metadata.shared), regs, stack, _cpu() - c0
    except Exception as e:  # noqa: BLE001  (the compiler's error, reported verbatim)
        msg = f"{type(e).__name__}: {e}"
        if not str(e).strip():
            msg += "\n" + traceback.format_exc(limit=-3)
        return i, False, msg, time.time() - t0, 0, 0, None, None, _cpu() - c0


def _cpu():
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--source", default=DEFAULT_ROOT, help="repository root whose kernels/ to compile (default: this checkout)"
    )
    src.add_argument("--installed", action="store_true", help="compile the installed fusedattn.kernels instead")
    ap.add_argument("--quick", action="store_true", help="fp16 only, a few head dims (a smoke test)")
    ap.add_argument("--list", action="store_true", help="list the compile jobs, compile nothing")
    ap.add_argument(
        "--cache-dir",
        help="Triton cache dir to reuse (default: a fresh temporary one, so every kernel is really compiled)",
    )
    ap.add_argument("--filter", help="only cases whose label contains this string")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per compiled job")
    ap.add_argument("--spills", action="store_true", help="list the variants that spill registers")
    args = ap.parse_args(argv)

    t_start = time.time()
    tmp = None
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="triton-compile-check-")
        os.environ["TRITON_CACHE_DIR"] = tmp.name

    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    try:  # the CUDA backend must be there (it needs no GPU, only its compiler and ptxas)
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", args.arch[0], 32))
    except Exception as e:  # noqa: BLE001
        print(f"triton {triton.__version__}: no CUDA backend ({type(e).__name__}: {e})", file=sys.stderr)
        return 2

    _, where = import_kernels(None if args.installed else args.source)
    print(
        f"triton {triton.__version__}, torch {torch.__version__}; kernels from {where}; targets "
        f"{', '.join(f'sm_{a}' for a in args.arch)}; cache {os.environ['TRITON_CACHE_DIR']}",
        flush=True,
    )

    cap = Capture(args.arch)
    cap.install()
    torch.manual_seed(0)
    case_errors = []
    all_cases = cases(args.quick)
    if args.filter:
        all_cases = [c for c in all_cases if args.filter in c[0]]
    for label, run, all_configs in all_cases:
        cap.case = label
        cap.all_configs = all_configs
        try:
            run()
        except Exception as e:  # noqa: BLE001  (the launcher itself failed, before any compile: reported)
            case_errors.append((label, f"{type(e).__name__}: {e}", traceback.format_exc(limit=-4)))
    jobs = list(cap.jobs.values())
    # a fixed pseudo-random order: the slow fp32 compiles spread over the run (progress lines are representative)
    jobs.sort(key=lambda j: (j.kernel, j.arch, repr(j.signature), j.config))
    import random

    random.Random(0).shuffle(jobs)
    _JOBS[:] = jobs
    t_capture, cpu_capture = time.time() - t_start, _cpu()
    print(
        f"{len(all_cases)} cases -> {cap.n_launches} launches -> {len(jobs)} distinct compile jobs "
        f"({t_capture:.1f}s to capture)",
        flush=True,
    )
    if args.list:
        for j in jobs:
            print(f"  sm_{j.arch} {j.kernel} [{j.config}] {_short(j)}  <- {j.cases[0]}")
        return 0

    t_compile = time.time()
    results = {}
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork")  # workers inherit the captured jobs (JITFunctions do not pickle)
        with ctx.Pool(args.jobs) as pool:
            for r in pool.imap_unordered(_compile, range(len(jobs))):
                results[r[0]] = r
                _progress(r, jobs, args.verbose, len(results))
    else:
        for i in range(len(jobs)):
            r = _compile(i)
            results[i] = r
            _progress(r, jobs, args.verbose, len(results))

    cpu = _cpu()
    cpu_jobs = sum(r[8] for r in results.values())
    t_compile = time.time() - t_compile
    # group summary: one line per (kernel, target)
    failed = [results[i] for i in range(len(jobs)) if not results[i][1]]
    by_group = {}
    for i, j in enumerate(jobs):
        g = by_group.setdefault((j.kernel, j.arch), [0, 0, 0.0, 0, set(), 0, 0])
        g[0] += 1
        g[1] += 0 if results[i][1] else 1
        g[2] += results[i][8]
        g[3] = max(g[3], results[i][5])
        g[4].add(j.config)
        g[5] = max(g[5], results[i][6] or 0)
        g[6] += 1 if (results[i][7] or 0) > 0 else 0
    print()
    for (kernel, arch), (n, nf, secs, smem, cfgs, regs, spill) in sorted(by_group.items()):
        print(
            f"  {kernel:32s} sm_{arch}: {n:4d} variants ({len(cfgs)} configs), {nf} failed, {secs:6.1f}s "
            f"CPU, max shared {smem / 1024:.0f} KiB, max {regs} regs, {spill} with a stack frame (spills)"
        )
    if args.spills:
        print("\nvariants with a stack frame (register spills; a performance note, not a failure):")
        for i, j in enumerate(jobs):
            if (results[i][7] or 0) > 0:
                print(
                    f"  sm_{j.arch} {j.kernel} [{j.config}] stack {results[i][7]} B, {results[i][6]} regs, "
                    f"cubin {results[i][4] // 1024} KiB  <- {j.cases[0]}"
                )

    # shared memory against the target's limit
    over_all = [(i, j) for i, j in enumerate(jobs) if results[i][1] and results[i][5] > SMEM_LIMIT.get(j.arch, 1 << 30)]
    over = [(i, j) for i, j in over_all if j.groups]  # autotuned: the autotuner skips the config on that GPU
    unloadable = [(j.arch, None, [i]) for i, j in over_all if not j.groups]  # not autotuned: cannot launch
    for (arch, gid), keys in cap.groups.items():
        if (arch, gid) not in cap.full_groups:
            continue
        idx = [jobs.index(cap.jobs[k]) for k in dict.fromkeys(keys)]
        ok = [i for i in idx if results[i][1]]
        if ok and all(results[i][5] > SMEM_LIMIT.get(arch, 1 << 30) for i in ok):
            unloadable.append((arch, gid, idx))
    if over:
        print(
            f"\n{len(over)} compiled variants need more shared memory than their target allows (the autotuner "
            f"skips them there):"
        )
        seen = set()
        for i, j in over:
            k = (j.kernel, j.arch, j.config)
            if k in seen:
                continue
            seen.add(k)
            print(
                f"  sm_{j.arch} {j.kernel} [{j.config}]: {results[i][5] / 1024:.0f} KiB > "
                f"{SMEM_LIMIT[j.arch] / 1024:.0f} KiB  (e.g. {j.cases[0]})"
            )

    for label, msg, tb in case_errors:
        print(f"\nCASE FAILED (launcher raised before compiling): {label}\n  {msg}\n{tb}")
    for i, ok, msg, secs, size, smem, _, _, _ in failed:
        j = jobs[i]
        print(
            f"\nCOMPILE FAILED: sm_{j.arch} {j.kernel} config [{j.config}]\n  case: {j.cases[0]}"
            f"{f' (+{len(j.cases) - 1} more)' if len(j.cases) > 1 else ''}\n  {_short(j)}\n  {msg.strip()}"
        )
    for arch, gid, idx in unloadable:
        j = jobs[idx[0]]
        what = "every config needs" if gid is not None else "the kernel (not autotuned) needs"
        print(
            f"\nNO CONFIG FITS: sm_{arch} {j.kernel}: {what} more than "
            f"{SMEM_LIMIT[arch] / 1024:.0f} KiB of shared memory ({', '.join(f'{results[i][5] // 1024} KiB' for i in idx)})"
            f"\n  case: {j.cases[0]}"
        )

    wall = time.time() - t_start
    n_kernels = len({j.kernel for j in jobs})
    n_fail = len(failed) + len(case_errors) + len(unloadable)
    print(
        f"\nSUMMARY: {len(jobs)} compiles ({n_kernels} kernels x configs x specializations x "
        f"{len(args.arch)} targets), {len(failed)} failed, {len(case_errors)} cases failed to launch, "
        f"{len(unloadable)} launches with no loadable config; {len(over)} variants over the shared-memory limit "
        f"(skipped by the autotuner); wall {wall:.0f}s with --jobs {args.jobs} (capture {t_capture:.0f}s, "
        f"compile {t_compile:.0f}s; {cpu:.0f} CPU-s in all, "
        f"{cpu_jobs:.0f} of them compiling: ~{cpu_capture + cpu_jobs / max(args.jobs, 1):.0f}s on {args.jobs} idle cores)"
    )
    if tmp is not None:
        tmp.cleanup()
    return 1 if n_fail else 0


def _short(j):
    cx = {k[0] if isinstance(k, tuple) and len(k) == 1 else k: v for k, v in j.constexprs.items()}
    names = [p.name for p in j.fn.params]
    cx = ", ".join(f"{names[k] if isinstance(k, int) else k}={v}" for k, v in cx.items())
    ptr = sorted({v for v in j.signature.values() if isinstance(v, str) and v.startswith("*")})
    return (
        f"ptrs {'/'.join(ptr)}; constexprs {cx}; num_warps={j.options.get('num_warps')} "
        f"num_stages={j.options.get('num_stages')}"
    )


def _progress(r, jobs, verbose, n):
    i, ok, msg, secs, size, smem, regs, stack, cpu = r
    j = jobs[i]
    if verbose or not ok:
        status = (
            f"ok  cubin {size}B shared {smem}B regs {regs} stack {stack}B"
            if ok
            else "FAILED " + msg.strip().splitlines()[-1][:160]
        )
        print(
            f"[{n}/{len(jobs)}] sm_{j.arch} {j.kernel} [{j.config}] {secs:.1f}s ({cpu:.1f} CPU-s) {status}"
            f"  <- {j.cases[0]}",
            flush=True,
        )
    elif n % 25 == 0 or n == len(jobs):
        print(f"[{n}/{len(jobs)}] compiled", flush=True)


if __name__ == "__main__":
    sys.exit(main())
