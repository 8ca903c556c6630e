"""Feature-cost benchmark family: each optional feature against the same kernel without it, in the same run.

``fusedattn`` is the call with the feature, ``fusedattn_plain`` the same call without it (same inputs, same
round-robin), so "ratio vs fusedattn_plain" = plain time / feature time: 1.00x costs nothing, 0.90x is 11% slower.
Features: attention sinks (``attention`` forward and forward + backward, ``decode_attention``), rotary in the
decode append (plain: the same append of one token, unrotated), ``cache_leftpad`` (plain: the same cache without
it; the feature reads 7 fewer keys per sequence). Every call is first checked against the float64 reference
with the feature.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..api import attention
from ..decode import decode_attention
from ..reference import attention_ref, decode_attention_ref
from .core import Row

name = "features"
in_all = False  # `bench all` leaves it out: `bench features`
title = "Feature cost (each feature vs the same kernel without it)"
metric_name = "GFLOP/s|GB/s"
flush = False
formula = (
    "attention: FLOPs = 4*B*H*L*L*D*0.5 (causal), x3.5 with the backward, GFLOP/s; decode: bytes = K+V cache read "
    "+ Q + O, GB/s. 'ratio vs fusedattn_plain' = time without the feature / time with it (< 1: the feature's cost)."
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PAD = 7  # cache_leftpad's padding per sequence


def cases(*, quick: bool, device: str, dtypes: Optional[list[str]]) -> list[dict]:
    dts = dtypes or (["bf16", "fp32"] if device == "cpu" else ["bf16", "fp16"])
    L_att = 512 if quick else 2048
    L_dec = 1024 if quick else 4096
    out = []
    for dt in dts:
        for p in ("fwd", "fwd+bwd"):
            out.append(dict(op="attention", feature="sinks", dtype=dt, B=1, Hq=16, Hkv=16, D=64, L=L_att, pass_=p))
        for feat in ("sinks", "rotary", "leftpad"):
            out.append(dict(op="decode", feature=feat, dtype=dt, B=8, Hq=32, Hkv=8, D=128, L=L_dec, pass_="fwd"))
    if quick:
        out = [c for c in out if c["dtype"] == dts[0]]
    return out


def _feature_kwargs(case: dict, inputs: dict) -> dict:
    f = case["feature"]
    if f == "sinks":
        return dict(sinks=inputs["sinks"])
    if f == "rotary":
        return dict(rotary_cos=inputs["cos"], rotary_sin=inputs["sin"])
    return dict(cache_leftpad=inputs["pads"])


def _run(with_feature: bool):
    def fn(inputs: dict, case: dict):
        extra = _feature_kwargs(case, inputs) if with_feature else {}
        if case["op"] == "attention":
            out = attention(inputs["q"], inputs["k"], inputs["v"], causal=True, **extra)
            if case["pass_"] == "fwd+bwd":
                torch.autograd.grad(out, [inputs["q"], inputs["k"], inputs["v"]], inputs["g"])
            return out
        kw = dict(cache_seqlens=inputs["lens"])
        if case["feature"] == "rotary":  # both calls append the token; one rotates it first
            kw.update(k_new=inputs["kn"], v_new=inputs["vn"])
        with torch.no_grad():
            return decode_attention(inputs["q"], inputs["kc"], inputs["vc"], **kw, **extra)

    fn.with_feature = with_feature
    return fn


def backends(device: str, quick: bool = False) -> dict:
    return {"fusedattn": _run(True), "fusedattn_plain": _run(False)}


def needs_grad(case: dict) -> bool:
    return case["pass_"] == "fwd+bwd"


def make_inputs(case: dict, device: str, requires_grad: bool = False, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[case["dtype"]]
    B, Hq, Hkv, D, L = (case[k] for k in ("B", "Hq", "Hkv", "D", "L"))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dt)

    x = dict(sinks=torch.randn(Hq, generator=g, device=device))
    if case["op"] == "attention":
        x.update(q=rnd(B, Hq, L, D), k=rnd(B, Hkv, L, D), v=rnd(B, Hkv, L, D), g=rnd(B, Hq, L, D))
        for n in ("q", "k", "v"):
            x[n].requires_grad_(requires_grad)
        return x
    x.update(q=rnd(B, 1, Hq, D), kc=rnd(B, L, Hkv, D), vc=rnd(B, L, Hkv, D), kn=rnd(B, 1, Hkv, D), vn=rnd(B, 1, Hkv, D))
    full = L - 1 if case["feature"] == "rotary" else L  # room for the appended token
    x["lens"] = torch.full((B,), full, dtype=torch.int32, device=device)
    x["pads"] = torch.full((B,), PAD, dtype=torch.int32, device=device)
    angle = torch.rand(L, D // 2, generator=g, device=device) * 2 * math.pi
    x["cos"], x["sin"] = angle.cos(), angle.sin()
    return x


def call(fn, inputs, case):
    return fn(inputs, case)


def check(fn, case: dict, device: str) -> tuple[float, float]:
    """Max error vs the float64 reference of the same call (with the feature, or plain without it), on a reduced
    copy of the case."""
    small = dict(case, L=min(case["L"], 256), B=min(case["B"], 2))
    x = make_inputs(small, device, seed=1)
    if small["op"] == "attention":
        out = fn(x, dict(small, pass_="fwd"))
        sinks = x["sinks"] if fn.with_feature else None
        ref = attention_ref(
            *(x[n].double() for n in ("q", "k", "v")), causal=True, sinks=sinks, compute_dtype=torch.float64
        )
    else:
        xr = {
            n: (t.double() if t.is_floating_point() and n not in ("sinks", "cos", "sin") else t) for n, t in x.items()
        }
        feat = _feature_kwargs(small, xr) if fn.with_feature else {}
        out = fn(x, small)
        kw = dict(k_new=xr["kn"], v_new=xr["vn"]) if small["feature"] == "rotary" else {}
        ref = decode_attention_ref(
            xr["q"], xr["kc"], xr["vc"], cache_seqlens=xr["lens"], compute_dtype=torch.float64, **kw, **feat
        )
    err = (out.double() - ref).abs().max().item()
    return err, (1e-4 if case["dtype"] == "fp32" else 3e-2)


def should_time(case: dict, backend: str) -> bool:
    return True


def repeats(case: dict, default: int) -> int:
    return default


def measure_memory(case: dict) -> bool:
    return False


def work(case: dict) -> float:
    B, Hq, Hkv, D, L = (case[k] for k in ("B", "Hq", "Hkv", "D", "L"))
    elt = DTYPES[case["dtype"]].itemsize
    if case["op"] == "attention":
        return 4 * B * Hq * L * L * D * 0.5 * (3.5 if case["pass_"] == "fwd+bwd" else 1.0)
    return 2 * B * L * Hkv * D * elt + 2 * B * Hq * D * elt


def format_row(r: Row, rows: list[Row]) -> str:
    c = r.case
    head = f"{c['op']:9s} {c['feature']:7s} {c['pass_']:7s} {c['dtype']:4s} B={c['B']} Hq={c['Hq']} L={c['L']}"
    if r.status != "ok":
        return f"{head} {r.backend:15s} {r.status}"
    plain = next((x for x in rows if x.case == c and x.backend == "fusedattn_plain" and x.status == "ok"), None)
    ratio = f"plain/feature {plain.median_ms / r.median_ms:5.2f}x" if plain and r.backend == "fusedattn" else ""
    return f"{head} {r.backend:15s} {r.median_ms:9.3f} ms [{r.min_ms:.3f}..{r.max_ms:.3f}] err {r.max_err:.1e} {ratio}"


def plot(rows: list[Row], info: dict, out_dir: str, tag: str) -> list[str]:
    return []  # one ratio per case: the table says it
