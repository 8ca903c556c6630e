"""Attention benchmark family: fusedattn vs torch SDPA (each of its backends), FlexAttention and,
when installed, flash_attn / xformers, on the same inputs in the same run."""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import api, dispatch
from ..reference import attention_ref
from .core import Row, plot_vs_length

name = "attention"
title = "Attention"
metric_name = "GFLOP/s"
flush = False  # compute-bound: the working set is re-read many times per call anyway
formula = (
    "FLOPs = 4*B*H*L^2*D, x0.5 when causal, x3.5 for fwd+bwd (backward = 2.5x forward). "
    "Layout (B, H, L, D), self-attention (Lq = Lk = L)."
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cases(*, quick: bool, device: str, dtypes: Optional[list[str]]) -> list[dict]:
    def case(B, H, L, D, dt, causal, mode):
        return {"B": B, "H": H, "L": L, "D": D, "dtype": dt, "causal": causal, "mode": mode}

    if device == "cuda":
        dts = dtypes or ["bf16", "fp16"]
        if quick:
            return [case(4, 16, 2048, 128, "bf16", c, m) for m in ("fwd", "fwd+bwd") for c in (False, True)]
        # B*L = 16k tokens, H*D = 2048 (the FlashAttention paper's benchmark grid); run_order measures them
        return [
            case(16384 // L, 2048 // D, L, D, dt, c, m)
            for m in ("fwd", "fwd+bwd")
            for dt in dts
            for D in (64, 128, 256)
            for c in (False, True)
            for L in (512, 1024, 2048, 4096, 8192, 16384)
        ]
    dts = dtypes or ["fp32", "bf16"]
    if quick:
        return [case(1, 8, 1024, 64, dt, c, "fwd") for dt in dts for c in (False, True)]
    out = [
        case(1, 8, L, 64, dt, c, m)
        for m in ("fwd", "fwd+bwd")
        for dt in dts
        for c in (False, True)
        for L in (512, 2048, 8192)
        if not (m == "fwd+bwd" and L > 2048)
    ]
    if "fp32" in dts:
        out.append(case(1, 8, 32768, 64, "fp32", False, "fwd"))  # memory: must stay O(L*D)
    return out


LENGTH_PRIORITY = (4096, 16384, 1024, 8192, 2048, 512)  # CUDA: the order in which lengths are measured


def run_order(cases: list[dict], device: str) -> list[dict]:
    """The order to measure the cases in. On CUDA: dtype by dtype, each length (4k, 16k, 1k, ...) for every mode,
    head dim and causality before the next length, so a run cut short by --time-cap has every kind of case at
    the lengths it reached rather than every length of some kinds. On the CPU: as listed."""
    if device != "cuda":
        return cases
    dts = list(dict.fromkeys(c["dtype"] for c in cases))
    rank = {L: i for i, L in enumerate(LENGTH_PRIORITY)}
    return sorted(cases, key=lambda c: (dts.index(c["dtype"]), rank.get(c["L"], len(rank)), c["L"]))


def _sdpa_with(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def _flex(device: str) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import torch._dynamo

    # one compiled kernel per shape: raise the recompile limit so later shapes are not silently
    # run by flex's unfused eager fallback
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def fn(q, k, v, causal):
        if not causal:
            return compiled(q, k, v)
        key = (q.shape[-2], k.shape[-2])
        if key not in masks:
            masks[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, key[0], key[1], device=device)
        return compiled(q, k, v, block_mask=masks[key])

    return fn


def backends(device: str, quick: bool = False) -> dict:
    """name -> fn(q, k, v, causal), or a string saying why that peer is absent. ``quick`` keeps
    fusedattn and torch's default SDPA only (the others are listed as skipped)."""
    from torch.nn.attention import SDPBackend

    out: dict = {}
    ours = "cpu" if device == "cpu" else None
    if device == "cuda":
        for b in ("cuda", "triton"):
            if dispatch.available_backends()[b] is None:
                ours = b
                break
    if ours is None:
        out["fusedattn"] = f"no fused kernel for {device} in this build ({dispatch.available_backends()['triton']})"
    else:
        out["fusedattn"] = lambda q, k, v, causal: api.attention(q, k, v, causal=causal, backend=ours)
    if ours == "cuda" and dispatch.available_backends()["triton"] is None:  # both GPU kernels of ours
        out["fusedattn_triton"] = lambda q, k, v, causal: api.attention(q, k, v, causal=causal, backend="triton")
    out["torch_sdpa"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if quick:
        out["other peers"] = "skipped in --quick (torch_sdpa[<backend>], flex_attention, flash_attn, xformers)"
        return out
    if device == "cpu":
        out["torch_sdpa[math]"] = _sdpa_with(SDPBackend.MATH)
        out["torch_sdpa[flash]"] = _sdpa_with(SDPBackend.FLASH_ATTENTION)
    else:
        out["torch_sdpa[flash]"] = _sdpa_with(SDPBackend.FLASH_ATTENTION)
        out["torch_sdpa[efficient]"] = _sdpa_with(SDPBackend.EFFICIENT_ATTENTION)
        out["torch_sdpa[cudnn]"] = _sdpa_with(SDPBackend.CUDNN_ATTENTION)
    out["flex_attention"] = _flex(device)
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func

        out["flash_attn"] = lambda q, k, v, causal: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    else:
        out["flash_attn"] = "not installed" if device == "cuda" else "GPU only"
    if device == "cuda" and importlib.util.find_spec("xformers") is not None:
        import xformers.ops as xops

        def _xf(q, k, v, causal):
            bias = xops.LowerTriangularMask() if causal else None
            return xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
            ).transpose(1, 2)

        out["xformers"] = _xf
    else:
        out["xformers"] = "not installed" if device == "cuda" else "GPU only"
    return out


def needs_grad(case: dict) -> bool:
    return case["mode"] == "fwd+bwd"


def make_inputs(case: dict, device: str, requires_grad: bool, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case["B"], case["H"], case["L"], case["D"])
    qkv = [
        torch.randn(shape, generator=g, device=device, dtype=DTYPES[case["dtype"]]).requires_grad_(requires_grad)
        for _ in range(3)
    ]
    grad = torch.randn(shape, generator=g, device=device, dtype=DTYPES[case["dtype"]]) if requires_grad else None
    return qkv + [grad]


def call(fn, inputs, case):
    q, k, v, grad = inputs
    if grad is None:
        with torch.no_grad():
            return fn(q, k, v, case["causal"])
    q.grad = k.grad = v.grad = None
    out = fn(q, k, v, case["causal"])
    out.backward(grad)
    return out


def check(fn, case: dict, device: str) -> tuple[float, float]:
    """(max error vs the float64 reference, tolerance) on a reduced copy of the case (L <= 1024,
    2 heads, batch 1: the same code paths at a size the reference can materialize)."""
    small = dict(case, B=1, H=min(case["H"], 2), L=min(case["L"], 1024), mode="fwd")
    q, k, v, _ = make_inputs(small, device, requires_grad=False, seed=1)
    with torch.no_grad():
        out = fn(q, k, v, case["causal"])
    ref = attention_ref(q, k, v, causal=case["causal"], compute_dtype=torch.float64)
    err = (out.double() - ref.double()).abs().max().item()
    tol = 1e-4 if case["dtype"] == "fp32" else 3e-2
    return err, tol


def should_time(case: dict, backend: str) -> bool:
    # torch's math backend materializes B*H*L^2 scores (several GB at L = 8192); flex on the CPU
    # compiles for minutes at the largest size.
    if backend == "torch_sdpa[math]" and case["L"] > 2048:
        return False
    if case["L"] >= 32768 and backend not in ("fusedattn", "torch_sdpa"):
        return False
    return True


def repeats(case: dict, default: int) -> int:
    return 1 if case["L"] >= 32768 else 3 if case["L"] >= 8192 else default


def measure_memory(case: dict) -> bool:
    return case["mode"] == "fwd" and case["L"] in (2048, 32768)


def work(case: dict) -> float:
    f = 4.0 * case["B"] * case["H"] * case["L"] ** 2 * case["D"]
    return f * (0.5 if case["causal"] else 1.0) * (3.5 if case["mode"] == "fwd+bwd" else 1.0)


def format_row(r: Row, rows: list[Row]) -> str:
    c = r.case
    head = f"{c['mode']:8s} {c['dtype']:5s} causal={int(c['causal'])} B={c['B']} H={c['H']} L={c['L']:6d} D={c['D']:3d}"
    if r.status != "ok":
        return f"{head} {r.backend:22s} {r.status}"
    ours = next((x for x in rows if x.case == c and x.backend == "fusedattn" and x.status == "ok"), None)
    ratio = f"{r.median_ms / ours.median_ms:5.2f}x vs ours" if ours and r.backend != "fusedattn" else ""
    mem = f"{r.peak_extra_mib:7.0f} MiB" if r.peak_extra_mib is not None else "      - MiB"
    return (
        f"{head} {r.backend:22s} {r.median_ms:10.2f} ms [{r.min_ms:.2f}..{r.max_ms:.2f}] "
        f"{r.metric:8.1f} GFLOP/s {mem} err {r.max_err:.1e} {ratio}"
    )


def plot(rows: list[Row], info: dict, out_dir: str, tag: str) -> list[str]:
    """GFLOP/s vs sequence length, one line per backend, one panel per (mode, dtype, causal, D)."""
    return plot_vs_length(
        rows,
        info,
        out_dir,
        tag,
        family="attention",
        group=lambda c: (c["mode"], c["dtype"], c["causal"], c["D"]),
        title=lambda g: f"{g[0]} {g[1]} {'causal' if g[2] else 'non-causal'} D={g[3]}",
        xlabel="sequence length",
        ylabel="GFLOP/s",
    )
