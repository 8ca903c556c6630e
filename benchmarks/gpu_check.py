"""The GPU session's checks (benchmarks/gpu_session.sh): a stratified correctness grid, the small case run
under compute-sanitizer, and the output-file budget.

    python benchmarks/gpu_check.py grid --device cuda --backends cuda,triton --time-cap 160 --out OUT/grid.json
    python benchmarks/gpu_check.py small-case --device cuda --backend cuda     # under compute-sanitizer
    python benchmarks/gpu_check.py budget OUT --max-files 8 --max-mib 16 --max-depth 2

grid: forward, backward, varlen, decode (paged and contiguous, with in-place append), merge; per backend a
pairwise (all-pairs) set over dtype, head dim, odd lengths, causal alignment (none / bottom-right / top-left),
GQA, ... with fixed seeds; every output and gradient compared with the float64 reference under FlashAttention's
2x rule: max|out - ref| <= 2 * max|base - ref| + 1e-5 (3x and a floor of 1e-5 * max|ref grad| for gradients),
base = the reference computed in the input dtype (tests/conftest.py's assert_close_2x; restated here because
this script runs against an installed wheel, without the test tree or pytest). Each (family, backend) stream
gets an equal share of the time (the next case comes from the stream that has used the least) and no case
starts that would end after --time-cap, so a capped grid still covers every family and backend; OUT is rewritten after every case, so
a killed run leaves what it did. Exit status 1 when a case failed or raised.

Run it by path from outside the source tree: sys.path then holds benchmarks/, not the checkout, and
`import fusedattn` is the installed wheel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import traceback

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------------------
# the 2x rule and the pairwise builder (as tests/conftest.py)
# --------------------------------------------------------------------------------------------------------------
def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in float64; equal infinities and NaN-vs-NaN agree, a NaN/inf on one side only is inf."""
    if a.shape != ref.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    same = (a == ref) | (a.isnan() & ref.isnan())
    diff = (a - ref).abs().masked_fill(same, 0.0)
    return torch.nan_to_num(diff, nan=float("inf")).max().item()


def compare(name: str, out, ref, base, factor: float = 2.0, atol: float = 1e-5) -> dict:
    err, base_err = max_abs_err(out, ref), max_abs_err(base, ref)
    bound = factor * base_err + atol
    return {"name": name, "err": err, "base_err": base_err, "bound": bound, "ok": bool(err <= bound)}


def pairwise(factors: dict) -> list[dict]:
    """Deterministic greedy covering array of strength 2 (every value pair of every two factors in some case)."""
    names = list(factors)
    if len(names) < 2:
        return [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]
    uncovered = {
        (a, ia, b, ib)
        for a, b in itertools.combinations(range(len(names)), 2)
        for ia in range(len(factors[names[a]]))
        for ib in range(len(factors[names[b]]))
    }
    cases = []
    while uncovered:
        a, ia, b, ib = min(uncovered)
        choice = {a: ia, b: ib}
        for f in range(len(names)):
            if f in choice:
                continue
            gains = [
                sum(((g, choice[g], f, iv) if g < f else (f, iv, g, choice[g])) in uncovered for g in choice)
                for iv in range(len(factors[names[f]]))
            ]
            choice[f] = gains.index(max(gains))
        for g, h in itertools.combinations(sorted(choice), 2):
            uncovered.discard((g, choice[g], h, choice[h]))
        cases.append({names[f]: factors[names[f]][choice[f]] for f in range(len(names))})
    return cases


def randn(gen, *shape, dtype, device):
    """Drawn in float32 on the CPU (the same values on every device), then cast and moved."""
    return torch.randn(*shape, generator=gen).to(device, dtype)


def grads(fn, inputs, g_out):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)[0]
    return torch.autograd.grad([out], inputs, [g_out.to(out.device, out.dtype)])


def grad_checks(got, ref, base) -> list[dict]:
    atol = 1e-5 * max([1.0] + [r.abs().max().item() for r in ref if r.numel()])
    return [compare(n, g, r, b, factor=3.0, atol=atol) for n, g, r, b in zip(("dq", "dk", "dv"), got, ref, base)]


# --------------------------------------------------------------------------------------------------------------
# the families: cases(backend, small) -> list of case dicts; run(case, backend, device, gen) -> list of checks
# --------------------------------------------------------------------------------------------------------------
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (6, 1)}


def attention_cases(backend: str, small: bool) -> list[dict]:
    lens = (
        [(17, 33), (64, 64), (1, 40), (40, 23)]
        if small
        else [(128, 128), (113, 203), (257, 129), (1, 300), (511, 1000), (1000, 511)]
    )
    return pairwise(
        {
            "dtype": ["fp16", "bf16"],
            "D": [64, 128, 256],
            "lens": lens,
            "causal": ["none", "bottom_right", "top_left"],
            "heads": list(HEADS),
            "mode": ["fwd", "fwd+bwd"],
        }
    )


def run_attention(case: dict, backend: str, device: str, gen) -> list[dict]:
    import fusedattn

    dt, D, (Lq, Lk), causal = DTYPES[case["dtype"]], case["D"], case["lens"], case["causal"]
    Hq, Hkv = HEADS[case["heads"]]
    B = 2
    q = randn(gen, B, Hq, Lq, D, dtype=dt, device=device)
    k, v = (randn(gen, B, Hkv, Lk, D, dtype=dt, device=device) for _ in range(2))
    rkw = dict(
        causal=causal != "none", causal_align="top_left" if causal == "top_left" else "bottom_right", return_lse=True
    )

    def kernel(q, k, v):
        if causal == "top_left":  # the public function is bottom-right aligned: the registered op's flag
            ops = torch.ops.fusedattn
            op = ops.triton_attention_fwd if backend == "triton" else ops.attention_fwd
            return op(q, k, v, None, D**-0.5, -1, 0, False, 0.0)
        return fusedattn.attention(q, k, v, causal=causal == "bottom_right", return_lse=True, backend=backend)

    def ref(*x):
        return fusedattn.attention_ref(*x, compute_dtype=torch.float64, **rkw)

    def base(*x):
        return fusedattn.attention_ref(*x, compute_dtype=dt, **rkw)

    with torch.no_grad():
        out, lse = kernel(q, k, v)
        r_out, r_lse = ref(q.double(), k.double(), v.double())
        b_out, b_lse = base(q, k, v)
    checks = [compare("out", out, r_out, b_out), compare("lse", lse, r_lse, b_lse)]
    if case["mode"] == "fwd+bwd":
        g = randn(gen, B, Hq, Lq, D, dtype=dt, device=device)
        checks += grad_checks(
            grads(kernel, [q, k, v], g),
            grads(ref, [q.double(), k.double(), v.double()], g.double()),
            grads(base, [q, k, v], g),
        )
    return checks


def varlen_cases(backend: str, small: bool) -> list[dict]:
    seqs = (
        [[(5, 7), (0, 3), (40, 21)], [(33, 33), (1, 1)], [(17, 64), (64, 17), (3, 0)]]
        if small
        else [[(5, 7), (0, 3), (130, 64), (257, 257)], [(128, 128), (1, 1), (77, 300)], [(300, 77), (64, 640), (3, 0)]]
    )
    return pairwise(
        {
            "dtype": ["fp16", "bf16"],
            "D": [64, 128, 256],
            "seqs": seqs,
            "causal": [False, True],
            "heads": list(HEADS),
            "mode": ["fwd", "fwd+bwd"],
        }
    )


def run_varlen(case: dict, backend: str, device: str, gen) -> list[dict]:
    import fusedattn
    from fusedattn.reference import varlen_attention_ref

    dt, D = DTYPES[case["dtype"]], case["D"]
    Hq, Hkv = HEADS[case["heads"]]
    lq, lk = [s[0] for s in case["seqs"]], [s[1] for s in case["seqs"]]
    cu = [torch.tensor([0] + list(itertools.accumulate(x)), dtype=torch.int32, device=device) for x in (lq, lk)]
    q = randn(gen, sum(lq), Hq, D, dtype=dt, device=device)
    k, v = (randn(gen, sum(lk), Hkv, D, dtype=dt, device=device) for _ in range(2))
    args = (cu[0], cu[1], max(lq), max(lk))

    def kernel(q, k, v):
        return fusedattn.varlen_attention(q, k, v, *args, causal=case["causal"], return_lse=True, backend=backend)

    def ref(*x):
        return varlen_attention_ref(*x, *args, causal=case["causal"], return_lse=True, compute_dtype=torch.float64)

    def base(*x):
        return varlen_attention_ref(*x, *args, causal=case["causal"], return_lse=True, compute_dtype=dt)

    with torch.no_grad():
        out, lse = kernel(q, k, v)
        r_out, r_lse = ref(q.double(), k.double(), v.double())
        b_out, b_lse = base(q, k, v)
    checks = [compare("out", out, r_out, b_out), compare("lse", lse, r_lse, b_lse)]
    if case["mode"] == "fwd+bwd":
        g = randn(gen, sum(lq), Hq, D, dtype=dt, device=device)
        checks += grad_checks(
            grads(kernel, [q, k, v], g),
            grads(ref, [q.double(), k.double(), v.double()], g.double()),
            grads(base, [q, k, v], g),
        )
    return checks


def decode_cases(backend: str, small: bool) -> list[dict]:
    lens = [[0, 17, 300], [1000, 1, 64], [255, 256]] if not small else [[0, 17, 90], [100, 1], [31, 32]]
    return pairwise(
        {
            "dtype": ["fp16", "bf16"],
            "D": [64, 128, 256],
            "layout": ["contiguous", "paged16", "paged7"],
            "seqlens": lens,
            "Lq": [1, 3],
            "Lnew": [0, 1, 3],
            "heads": ["mha", "gqa", "gqa8"],
            "num_splits": [0, 3],
        }
    )


def run_decode(case: dict, backend: str, device: str, gen) -> list[dict]:
    import fusedattn
    from fusedattn.reference import decode_attention_ref

    dt, D, Lq, Lnew = DTYPES[case["dtype"]], case["D"], case["Lq"], case["Lnew"]
    Hq, Hkv = {"mha": (4, 4), "gqa": (8, 2), "gqa8": (32, 8)}[case["heads"]]
    lens = case["seqlens"]
    B, cap = len(lens), max(lens) + Lnew + 5
    q = randn(gen, B, Lq, Hq, D, dtype=dt, device=device)
    new = [randn(gen, B, Lnew, Hkv, D, dtype=dt, device=device) for _ in range(2)] if Lnew else [None, None]
    block_table = None
    if case["layout"] == "contiguous":
        shape = (B, cap, Hkv, D)
    else:
        page = int(case["layout"][5:])
        pages = -(-cap // page)
        shape = (B * pages + 3, page, Hkv, D)
        perm = torch.randperm(B * pages + 3, generator=gen)[: B * pages]
        block_table = perm.view(B, pages).to(device, torch.int32)
    caches = [randn(gen, *shape, dtype=dt, device=device) for _ in range(2)]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    kw = dict(cache_seqlens=seqlens, block_table=block_table, return_lse=True)
    with torch.no_grad():
        kc, vc = (c.clone() for c in caches)
        out, lse = fusedattn.decode_attention(
            q, kc, vc, k_new=new[0], v_new=new[1], num_splits=case["num_splits"], backend=backend, **kw
        )
        r64 = [c.double() for c in caches]
        r_out, r_lse = decode_attention_ref(
            q.double(),
            *r64,
            k_new=None if Lnew == 0 else new[0].double(),
            v_new=None if Lnew == 0 else new[1].double(),
            compute_dtype=torch.float64,
            **kw,
        )
        bc = [c.clone() for c in caches]
        b_out, b_lse = decode_attention_ref(q, *bc, k_new=new[0], v_new=new[1], compute_dtype=dt, **kw)
    # the in-place append is a copy: the kernel's caches must equal the reference's exactly afterwards
    cache_err = max(max_abs_err(kc, bc[0]), max_abs_err(vc, bc[1]))
    return [
        compare("out", out, r_out, b_out),
        compare("lse", lse, r_lse, b_lse),
        {"name": "cache after append", "err": cache_err, "bound": 0.0, "ok": cache_err == 0.0},
    ]


def merge_cases(backend: str, small: bool) -> list[dict]:
    return pairwise(
        {
            "dtype": ["fp16", "bf16", "fp32"],
            "D": [64, 128, 256],
            "shape": [(2, 1, 4), (3, 7, 8), (1, 33, 2)],
            "neg_inf": [False, True],
        }
    )


def run_merge(case: dict, backend: str, device: str, gen) -> list[dict]:
    import fusedattn
    from fusedattn.reference import merge_attention_states_ref

    dt, D = DTYPES[case["dtype"]], case["D"]
    B, L, H = case["shape"]
    oa, ob = (randn(gen, B, L, H, D, dtype=dt, device=device) for _ in range(2))
    la, lb = (randn(gen, B, H, L, dtype=torch.float32, device=device) * 4 for _ in range(2))
    if case["neg_inf"]:  # a side that saw no key, and a row where neither did
        la[..., 0] = -math.inf
        la[..., -1] = lb[..., -1] = -math.inf
    with torch.no_grad():
        out, lse = fusedattn.merge_attention_states(oa, la, ob, lb, backend=backend)
        r_out, r_lse = merge_attention_states_ref(oa.double(), la, ob.double(), lb, compute_dtype=torch.float64)
        b_out, b_lse = merge_attention_states_ref(oa, la, ob, lb, compute_dtype=dt)
    return [compare("out", out, r_out, b_out), compare("lse", lse, r_lse, b_lse)]


# family -> (cases, run, backends that have a kernel for it)
FAMILIES = {
    "attention": (attention_cases, run_attention, ("cpu", "cuda", "triton")),
    "varlen": (varlen_cases, run_varlen, ("cpu", "triton")),  # no CUDA C++ varlen kernel
    "decode": (decode_cases, run_decode, ("cpu", "cuda", "triton")),
    "merge": (merge_cases, run_merge, ("cpu", "cuda", "triton")),
}


def streams(backends: list[str], families: list[str], small: bool, max_cases: int | None) -> list[list[tuple]]:
    """One list of (family, backend, case index, case) per (family, backend) that has a kernel."""
    out = []
    for fam in families:
        make, _, served = FAMILIES[fam]
        for be in backends:
            if be in served:
                out.append([(fam, be, i, c) for i, c in enumerate(make(be, small)[:max_cases])])
    return out


def next_case(pending: list[list[tuple]], used: dict) -> tuple | None:
    """The next case to run: the first pending one of the stream that has used the least time so far. Each stream
    gets an equal share of the time cap; a fast one (precompiled CUDA kernels) finishes and leaves its share to
    the slow ones (Triton compiling each kernel variant on first use)."""
    live = [s for s in pending if s]
    if not live:
        return None
    s = min(live, key=lambda s: used.get(s[0][:2], 0.0))
    return s.pop(0)


def jsonable(case: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in case.items()}


def unsupported(fam: str, be: str, case: dict, device: str) -> str | None:
    """None when fusedattn.dispatch says `be` serves this case here, else its reason (the case is a skip)."""
    from fusedattn import dispatch

    reason = dispatch.available_backends()[be]
    if reason is None and hasattr(dispatch, "unsupported_reason"):  # the dispatch table
        reason = dispatch.unsupported_reason(
            fam, be, dispatch.Case(device, DTYPES[case["dtype"]], case["D"], case["D"])
        )
    elif reason is None and be == "cuda" and fam in ("attention", "decode"):  # before it
        reason = dispatch.cuda_unsupported_reason(DTYPES[case["dtype"]], case["D"], case["D"])
    return reason


def grid(args) -> int:
    import fusedattn

    t0 = time.monotonic()
    backends = [b for b in args.backends.split(",") if b]
    families = [f for f in args.families.split(",") if f]
    pending = streams(backends, families, args.small, args.max_cases)
    planned = sum(len(s) for s in pending)
    doc = {
        "device": args.device,
        "torch": torch.__version__,
        "fusedattn": fusedattn.__file__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "backends": fusedattn.available_backends(),
        "time_cap_s": args.time_cap,
        "rule": "max|out-ref| <= 2*max|base-ref| + 1e-5 (grads: 3x, floor 1e-5*max|ref grad|); ref float64, "
        "base = the reference in the input dtype",
        "planned": planned,
        "cases": [],
        "not_run": [],
    }

    def save():
        doc["elapsed_s"] = round(time.monotonic() - t0, 2)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.out)

    slowest, used = {}, {}  # per (family, backend): its slowest case, its total seconds
    while True:
        item = next_case(pending, used)
        if item is None:
            break
        fam, be, i, case = item
        elapsed = time.monotonic() - t0
        if elapsed + max(2 * slowest.get((fam, be), 0.0), 3.0) > args.time_cap:  # it might not end in time
            doc["not_run"] = [f"{f}/{b}/{j}" for f, b, j, _ in [item] + [x for s in pending for x in s]]
            print(f"time cap: {len(doc['not_run'])} of {planned} cases not run", flush=True)
            break
        rec = {"family": fam, "backend": be, "index": i, "case": jsonable(case)}
        reason = unsupported(fam, be, case, args.device)
        c0 = time.monotonic()
        if reason is not None:
            rec.update(status="skip", reason=reason)
        else:
            gen = torch.Generator().manual_seed(1000 * list(FAMILIES).index(fam) + i)
            try:
                checks = FAMILIES[fam][1](case, be, args.device, gen)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                rec.update(status="pass" if all(c["ok"] for c in checks) else "fail", checks=checks)
            except Exception as e:
                rec.update(
                    status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:]
                )
        rec["seconds"] = round(time.monotonic() - c0, 3)
        slowest[(fam, be)] = max(slowest.get((fam, be), 0.0), rec["seconds"])
        used[(fam, be)] = used.get((fam, be), 0.0) + rec["seconds"]
        doc["cases"].append(rec)
        if rec["status"] in ("fail", "error"):
            detail = rec.get("error") or "; ".join(
                f"{c['name']} {c['err']:.2e} > {c['bound']:.2e}" for c in rec["checks"] if not c["ok"]
            )
            print(f"{rec['status'].upper():5s} {fam}/{be} {jsonable(case)}: {detail}", flush=True)
        save()
    save()
    print(f"{'family':10s} {'backend':8s} {'pass':>5s} {'fail':>5s} {'error':>5s} {'skip':>5s} {'seconds':>8s}")
    for fam, be in dict.fromkeys((r["family"], r["backend"]) for r in doc["cases"]):
        sel = [r for r in doc["cases"] if r["family"] == fam and r["backend"] == be]
        cnt = {s: sum(r["status"] == s for r in sel) for s in ("pass", "fail", "error", "skip")}
        print(
            f"{fam:10s} {be:8s} {cnt['pass']:5d} {cnt['fail']:5d} {cnt['error']:5d} {cnt['skip']:5d} "
            f"{sum(r['seconds'] for r in sel):8.1f}"
        )
    bad = sum(r["status"] in ("fail", "error") for r in doc["cases"])
    print(
        f"grid: {len(doc['cases'])} of {planned} cases run in {doc['elapsed_s']:.0f} s, {bad} failed or raised; "
        f"{len(doc['not_run'])} not run (time cap); wrote {args.out}"
    )
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------------------
# the small case (compute-sanitizer): every CUDA kernel once, small odd shapes, through the public API
# --------------------------------------------------------------------------------------------------------------
def small_case(args) -> int:
    import fusedattn

    dev, be, dt = args.device, args.backend, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    # forward + backward (dK/dV and dQ kernels; D = 256 runs the two-pass dK/dV), GQA, odd lengths, causal
    for D, (Lq, Lk), (Hq, Hkv) in [(64, (97, 130), (4, 2)), (128, (33, 17), (2, 2)), (256, (70, 70), (2, 1))]:
        q = randn(gen, 1, Hq, Lq, D, dtype=dt, device=dev).requires_grad_()
        k, v = (randn(gen, 1, Hkv, Lk, D, dtype=dt, device=dev).requires_grad_() for _ in range(2))
        out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True, backend=be)
        (out.float().sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    # paged decode with an in-place append and a split-KV combine, then contiguous, then the merge
    B, Hkv, page, D = 3, 2, 16, 128
    lens = torch.tensor([0, 20, 75], dtype=torch.int32, device=dev)
    with torch.no_grad():
        k_cache, v_cache = (randn(gen, 20, page, Hkv, D, dtype=dt, device=dev) for _ in range(2))
        block_table = torch.randperm(20, generator=gen)[:18].view(B, 6).to(dev, torch.int32)
        q = randn(gen, B, 2, 8, D, dtype=dt, device=dev)
        k_new, v_new = (randn(gen, B, 2, Hkv, D, dtype=dt, device=dev) for _ in range(2))
        out, lse = fusedattn.decode_attention(
            q,
            k_cache,
            v_cache,
            cache_seqlens=lens,
            k_new=k_new,
            v_new=v_new,
            block_table=block_table,
            num_splits=3,
            return_lse=True,
            backend=be,
        )
        kc, vc = (randn(gen, B, 80, Hkv, D, dtype=dt, device=dev) for _ in range(2))
        out2, lse2 = fusedattn.decode_attention(
            q, kc, vc, cache_seqlens=lens, k_new=k_new, v_new=v_new, return_lse=True, backend=be
        )
        merged, _ = fusedattn.merge_attention_states(out, lse, out2, lse2, backend=be)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("small case ok", merged.float().abs().sum().item())
    return 0


# --------------------------------------------------------------------------------------------------------------
# the output budget: what the device tool brings back
# --------------------------------------------------------------------------------------------------------------
def check_budget(root: str, max_files: int, max_mib: float, max_depth: int) -> list[str]:
    """Problems with the files under ``root`` (empty: within budget): more than max_files files, a file over
    max_mib MiB, a file more than max_depth folders below root, a link or special file, an odd name."""
    problems, files = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if name in filenames or os.path.islink(path):
                files.append(rel)  # whatever is not a folder counts against the file limit
            if os.path.islink(path):
                problems.append(f"{rel}: a link (links do not come back)")
            elif not name.isascii() or not all(c.isalnum() or c in "._-+" for c in name):
                problems.append(f"{rel}: an odd character in the name")
            elif name in filenames and not os.path.isfile(path):
                problems.append(f"{rel}: not a plain file")
            elif name in filenames:
                if rel.count(os.sep) > max_depth:
                    problems.append(f"{rel}: {rel.count(os.sep)} folders deep (at most {max_depth})")
                mib = os.path.getsize(path) / 2**20
                if mib > max_mib:
                    problems.append(f"{rel}: {mib:.1f} MiB (at most {max_mib:g})")
    if len(files) > max_files:
        problems.append(f"{len(files)} files (at most {max_files}): {', '.join(sorted(files))}")
    return problems


def budget(args) -> int:
    for dirpath, _, filenames in sorted(os.walk(args.root)):
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            print(f"  {os.path.getsize(p) / 2**20:8.2f} MiB  {os.path.relpath(p, args.root)}")
    problems = check_budget(args.root, args.max_files, args.max_mib, args.max_depth)
    for p in problems:
        print(f"budget: {p}")
    print("budget: ok" if not problems else f"budget: {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grid", help="the stratified correctness grid")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--backends", default="cuda,triton", help="comma-separated (cpu, cuda, triton)")
    g.add_argument("--families", default=",".join(FAMILIES))
    g.add_argument("--time-cap", type=float, default=160.0, help="seconds; no case starts that would end later")
    g.add_argument("--small", action="store_true", help="smaller lengths (CPU / Triton interpreter)")
    g.add_argument("--max-cases", type=int, default=None, help="at most this many cases per family and backend")
    g.add_argument("--out", required=True, help="the JSON file")
    s = sub.add_parser("small-case", help="one small case through every kernel (for compute-sanitizer)")
    s.add_argument("--device", default="cuda")
    s.add_argument("--backend", default="cuda")
    b = sub.add_parser("budget", help="check the files under ROOT against the output limits")
    b.add_argument("root")
    b.add_argument("--max-files", type=int, default=8)
    b.add_argument("--max-mib", type=float, default=16.0)
    b.add_argument("--max-depth", type=int, default=2)
    args = ap.parse_args(argv)
    return {"grid": grid, "small-case": small_case, "budget": budget}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
