"""Decode benchmark family: fusedattn.decode_attention vs torch SDPA on the same KV cache.

Decoding reads the whole cache once per step, so the metric is bandwidth: GB/s = (K + V cache read + Q + O)
bytes / time, and its fraction of the machine's copy bandwidth, measured at the start of the same run
(``copy_bandwidth``: the best of several copies of a 1 GiB tensor into a preallocated one, read + write bytes;
a ``clone`` would time page faults of fresh memory, not the memory system).

Peers: ``torch_sdpa`` is ``F.scaled_dot_product_attention(enable_gqa=True)`` on the cache sliced to the
sequence length and transposed to (B, H, L, D); for a paged cache it first gathers the pages into a contiguous
(B, L, Hkv, D) tensor (torch has no paged attention), and that gather is part of its time. FlashInfer and
flash_attn (``flash_attn_with_kvcache``) are GPU peers, listed when installed.
"""
from __future__ import annotations

import importlib.util
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from ..decode import decode_attention
from ..reference import decode_attention_ref
from .core import Row, plot_vs_length, sync

name = "decode"
title = "Decode"
metric_name = "GB/s"
flush = True  # memory-bound: a 64 MiB buffer is rewritten between timed calls so no case runs from cache
formula = ("bytes = K+V cache read + Q + O = (2*B*L*Hkv*D + 2*B*Hq*D) * element size; GB/s = bytes / time. "
           "One new token per sequence (Lq = 1), all B sequences L keys long.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PAGE_SIZE = 16  # the paged layout's page size (vLLM's default)
MEMORY_BUDGET = 6 * 2**30  # bytes: larger cases are skipped (the cache), or their torch peer (cache + copies)

_copy_gbps: Optional[float] = None  # measured by prepare() at the start of the run


def copy_bandwidth(device: str) -> float:
    """Read + write GB/s of copying a 1 GiB tensor into a preallocated one (best of 5)."""
    src = torch.ones(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touches dst's pages
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best / 1e9


def prepare(device: str) -> None:
    """Measures the copy bandwidth before the cases run, and states it in the formula (tables, JSON)."""
    global formula, _copy_gbps
    _copy_gbps = copy_bandwidth(device)
    formula = (f"{formula.split(' Copy bandwidth')[0]} Copy bandwidth measured in this run: {_copy_gbps:.1f} GB/s "
               f"(read + write); '% of copy' = GB/s / copy bandwidth.")


def _case(B, Hkv, L, dt, layout, Hq=32, D=128):
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "L": L, "dtype": dt, "layout": layout}


def cache_bytes(case: dict) -> int:
    return 2 * case["B"] * case["L"] * case["Hkv"] * case["D"] * DTYPES[case["dtype"]].itemsize


def cases(*, quick: bool, device: str, dtypes: Optional[list[str]]) -> list[dict]:
    dts = dtypes or (["bf16", "fp32"] if device == "cpu" else ["bf16", "fp16"])
    paged = f"paged{PAGE_SIZE}"
    if quick:  # the target case (B=8, Hkv=8, L=4096, bf16) in both layouts, and two more
        out = [_case(8, 8, 4096, "bf16", "contiguous"), _case(8, 8, 4096, "bf16", paged),
               _case(1, 8, 8192, "bf16", "contiguous"), _case(8, 8, 4096, "fp32", "contiguous")]
        return [c for c in out if c["dtype"] in dts]
    out = [_case(B, Hkv, L, dt, layout)
           for dt in dts for layout in ("contiguous", paged) for Hkv in (8, 32) for B in (1, 8, 64)
           for L in (512, 2048, 4096, 8192, 32768)]
    return [c for c in out if cache_bytes(c) <= MEMORY_BUDGET]


def _gather(cache: torch.Tensor, block_table: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L, H, D) contiguous keys from a paged (num_blocks, PAGE_SIZE, H, D) cache."""
    B, P = block_table.shape[0], cache.shape[1]
    pages = block_table[:, : -(-L // P)].long()  # (B, pages)
    return cache[pages].flatten(1, 2)[:, :L]  # (B, pages * P, H, D) -> (B, L, H, D)


def _torch_sdpa(q, k_cache, v_cache, seqlens, block_table, L):
    if block_table is not None:
        k, v = _gather(k_cache, block_table, L), _gather(v_cache, block_table, L)
    else:
        k, v = k_cache[:, :L], v_cache[:, :L]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return out.transpose(1, 2)  # (B, 1, Hq, D)


def backends(device: str, quick: bool = False) -> dict:
    """name -> fn(q, k_cache, v_cache, cache_seqlens, block_table, L) returning out (B, 1, Hq, D), or a string
    saying why that backend is absent."""
    out: dict = {}
    avail = dispatch.available_backends()
    # what "auto" runs there: the CUDA kernel (csrc/cuda/decode.cuh) when built, else Triton's
    ours = "cpu" if device == "cpu" else ("cuda" if avail["cuda"] is None else "triton") if device == "cuda" else None
    if ours is not None and avail[ours] is None:
        out["fusedattn"] = lambda q, kc, vc, lens, bt, L: decode_attention(q, kc, vc, cache_seqlens=lens,
                                                                           block_table=bt, backend=ours)
    else:
        out["fusedattn"] = (f"no fused decode kernel for {device} in this build"
                            + (f" ({ours}: {avail[ours]})" if ours else ""))
    if ours == "cuda" and avail["triton"] is None:  # both GPU kernels of ours, side by side
        out["fusedattn_triton"] = lambda q, kc, vc, lens, bt, L: decode_attention(q, kc, vc, cache_seqlens=lens,
                                                                                  block_table=bt, backend="triton")
    out["torch_sdpa"] = _torch_sdpa
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_with_kvcache

        out["flash_attn"] = lambda q, kc, vc, lens, bt, L: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                                                                   block_table=bt)
    else:
        out["flash_attn"] = "not installed" if device == "cuda" else "GPU only"
    out["flashinfer"] = ("GPU only" if device != "cuda" else "not installed"
                         if importlib.util.find_spec("flashinfer") is None else "installed but not wired up yet")
    return out


def needs_grad(case: dict) -> bool:
    return False


def make_inputs(case: dict, device: str, requires_grad: bool = False, seed: int = 0):
    """q (B, 1, Hq, D), the K/V cache (contiguous (B, L, Hkv, D), or paged with a shuffled block table), lengths."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case["dtype"]]
    B, L, Hkv, D = case["B"], case["L"], case["Hkv"], case["D"]
    q = torch.randn(B, 1, case["Hq"], D, generator=g, device=device, dtype=dtype)
    block_table = None
    if case["layout"] == "contiguous":
        shape = (B, L, Hkv, D)
    else:
        pages = -(-L // PAGE_SIZE)
        shape = (B * pages, PAGE_SIZE, Hkv, D)
        block_table = torch.randperm(B * pages, generator=g, device=device).view(B, pages).to(torch.int32)
    k_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
    seqlens = torch.full((B,), L, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, seqlens, block_table


def call(fn, inputs, case):
    q, k_cache, v_cache, seqlens, block_table = inputs
    with torch.no_grad():
        return fn(q, k_cache, v_cache, seqlens, block_table, case["L"])


def check(fn, case: dict, device: str) -> tuple[float, float]:
    """(max error vs the float64 reference, tolerance) on a reduced copy of the case (2 sequences, L <= 2048:
    the same code paths at a size the reference handles quickly)."""
    small = dict(case, B=min(case["B"], 2), L=min(case["L"], 2048))
    q, k_cache, v_cache, seqlens, block_table = make_inputs(small, device, seed=1)
    out = call(fn, (q, k_cache, v_cache, seqlens, block_table), small)
    ref = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=seqlens,
                               block_table=block_table, compute_dtype=torch.float64)
    err = (out.double() - ref).abs().max().item()
    return err, (1e-4 if case["dtype"] == "fp32" else 3e-2)


def should_time(case: dict, backend: str) -> bool:
    if backend == "torch_sdpa":  # its gather (paged) and GQA expansion copy the cache
        extra = cache_bytes(case) * ((1 if case["layout"] != "contiguous" else 0) + case["Hq"] // case["Hkv"])
        return cache_bytes(case) + extra <= MEMORY_BUDGET
    return True


def repeats(case: dict, default: int) -> int:
    return max(2, default // 2) if cache_bytes(case) >= 2**30 else default


def measure_memory(case: dict) -> bool:
    return False  # the only allocation is the output: nothing to see


def work(case: dict) -> float:
    elt = DTYPES[case["dtype"]].itemsize
    return cache_bytes(case) + 2 * case["B"] * case["Hq"] * case["D"] * elt


def fraction_of_copy(r: Row) -> str:
    return f"{r.metric / _copy_gbps:.0%}" if _copy_gbps and r.metric else "-"


extra_columns = [("% of copy", fraction_of_copy)]


def format_row(r: Row, rows: list[Row]) -> str:
    c = r.case
    head = (f"{c['dtype']:5s} {c['layout']:10s} B={c['B']:2d} Hq={c['Hq']} Hkv={c['Hkv']:2d} D={c['D']} "
            f"L={c['L']:6d}")
    if r.status != "ok":
        return f"{head} {r.backend:11s} {r.status}"
    ours = next((x for x in rows if x.case == c and x.backend == "fusedattn" and x.status == "ok"), None)
    ratio = f"{r.median_ms / ours.median_ms:6.2f}x vs ours" if ours and r.backend != "fusedattn" else ""
    return (f"{head} {r.backend:11s} {r.median_ms:9.3f} ms [{r.min_ms:.3f}..{r.max_ms:.3f}] {r.metric:6.1f} GB/s "
            f"({fraction_of_copy(r):>4s} of copy) err {r.max_err:.1e} {ratio}")


def plot(rows: list[Row], info: dict, out_dir: str, tag: str) -> list[str]:
    """GB/s vs cache length, one line per backend, one panel per (dtype, layout, B, Hkv); the copy bandwidth
    as a dashed line."""
    return plot_vs_length(rows, info, out_dir, tag, family="decode",
                          group=lambda c: (c["dtype"], c["layout"], c["B"], c["Hkv"]),
                          title=lambda g: f"{g[0]} {g[1]} B={g[2]} Hkv={g[3]}", xlabel="cache length",
                          ylabel="GB/s", hline=(_copy_gbps, "copy bandwidth") if _copy_gbps else None)
