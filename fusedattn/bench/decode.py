"""Decode benchmark family: fusedattn.decode_attention vs torch SDPA on the same KV cache.

Decoding reads the whole cache once per step, so the metric is bandwidth: GB/s = (K + V cache read + Q + O)
bytes / time, and its fraction of the machine's copy bandwidth. The copy (a 256 MiB tensor into a preallocated
one, read + write bytes) is timed beside every case, in the same round-robin as its kernels, so that both see
the machine in the same state: on a shared VM the memory bandwidth moves by +-30% within minutes.

The cache's memory: ``alloc="fusedattn"`` is ``fusedattn.zeros_kv_cache`` (what KVCache / PagedKVCache use:
transparent huge pages on the CPU), ``alloc="torch"`` a plain ``torch.randn`` tensor (4 KiB pages on the CPU).
On a GPU the two are the same.

Peers: ``torch_sdpa`` is ``F.scaled_dot_product_attention(enable_gqa=True)`` on the cache sliced to the
sequence length and transposed to (B, H, L, D); for a paged cache it first gathers the pages into a contiguous
(B, L, Hkv, D) tensor (torch has no paged attention), and that gather is part of its time. FlashInfer and
flash_attn (``flash_attn_with_kvcache``) are GPU peers, listed when installed.
"""

from __future__ import annotations

import importlib.util
import statistics
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from ..decode import decode_attention
from ..memory import zeros_kv_cache
from ..reference import decode_attention_ref
from .core import Row, plot_vs_length

name = "decode"
title = "Decode"
metric_name = "GB/s"
flush = True  # memory-bound: a 64 MiB buffer is read between timed calls so no case runs from cache
formula = (
    "bytes = K+V cache read + Q + O = (2*B*L*Hkv*D + 2*B*Hq*D) * element size; GB/s = bytes / time. "
    "One new token per sequence (Lq = 1), all B sequences L keys long. 'copy GB/s': a 256 MiB copy "
    "(read + write bytes) timed in the same round-robin as the case (median); '% of copy' = GB/s / that. "
    "alloc: the cache's memory (fusedattn = fusedattn.zeros_kv_cache, huge pages on the CPU; torch = "
    "torch.randn, 4 KiB pages)."
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PAGE_SIZE = 16  # the paged layout's page size (vLLM's default)
MEMORY_BUDGET = 6 * 2**30  # bytes: larger cases are skipped (the cache), or their torch peer (cache + copies)

COPY_MIB = 256  # the copy timed beside each case
_copy: dict = {}  # case -> copy GB/s (median) measured beside it
_copy_buf: Optional[tuple] = None


def _key(case: dict) -> tuple:
    return tuple(sorted(case.items()))


def companions(case: dict, device: str) -> dict:
    """Timed in the same round-robin as the case's kernels, not reported as backends: the copy."""
    global _copy_buf
    if _copy_buf is None or _copy_buf[0].device.type != torch.device(device).type:
        src = torch.ones(COPY_MIB * 2**20 // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touches dst's pages: the timed copies do not count page faults
        _copy_buf = (src, dst)
    src, dst = _copy_buf
    return {"copy": lambda: dst.copy_(src)}


def companion_times(case: dict, name: str, times_ms: list) -> None:
    src = _copy_buf[0]
    _copy[_key(case)] = 2 * src.numel() * src.element_size() / (statistics.median(times_ms) * 1e-3) / 1e9


def copy_gbps(case: dict) -> Optional[float]:
    return _copy.get(_key(case))


def _case(B, Hkv, L, dt, layout, Hq=32, D=128, alloc="fusedattn"):
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "L": L, "dtype": dt, "layout": layout, "alloc": alloc}


def _alloc(case: dict) -> str:
    return case.get("alloc", "fusedattn")  # a case without the key (hand-written): fusedattn's allocator


def cache_bytes(case: dict) -> int:
    return 2 * case["B"] * case["L"] * case["Hkv"] * case["D"] * DTYPES[case["dtype"]].itemsize


def cases(*, quick: bool, device: str, dtypes: Optional[list[str]]) -> list[dict]:
    dts = dtypes or (["bf16", "fp32"] if device == "cpu" else ["bf16", "fp16"])
    paged = f"paged{PAGE_SIZE}"
    # the target case (B=8, Hkv=8, L=4096, bf16) also on a plain torch tensor (CPU: 4 KiB pages)
    plain = [_case(8, 8, 4096, "bf16", "contiguous", alloc="torch")] if device == "cpu" else []
    if quick:  # the target case in both layouts, and two more
        out = [
            _case(8, 8, 4096, "bf16", "contiguous"),
            *plain,
            _case(8, 8, 4096, "bf16", paged),
            _case(1, 8, 8192, "bf16", "contiguous"),
            _case(8, 8, 4096, "fp32", "contiguous"),
        ]
        return [c for c in out if c["dtype"] in dts]
    out = [
        _case(B, Hkv, L, dt, layout)
        for dt in dts
        for layout in ("contiguous", paged)
        for Hkv in (8, 32)
        for B in (1, 8, 64)
        for L in (512, 2048, 4096, 8192, 32768)
    ]
    return [c for c in out if cache_bytes(c) <= MEMORY_BUDGET] + [c for c in plain if c["dtype"] in dts]


def _gather(cache: torch.Tensor, block_table: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L, H, D) contiguous keys from a paged (num_blocks, PAGE_SIZE, H, D) cache."""
    P = cache.shape[1]  # PAGE_SIZE
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
        out["fusedattn"] = lambda q, kc, vc, lens, bt, L: decode_attention(
            q, kc, vc, cache_seqlens=lens, block_table=bt, backend=ours
        )
    else:
        out["fusedattn"] = f"no fused decode kernel for {device} in this build" + (
            f" ({ours}: {avail[ours]})" if ours else ""
        )
    if ours == "cuda" and avail["triton"] is None:  # both GPU kernels of ours, side by side
        out["fusedattn_triton"] = lambda q, kc, vc, lens, bt, L: decode_attention(
            q, kc, vc, cache_seqlens=lens, block_table=bt, backend="triton"
        )
    out["torch_sdpa"] = _torch_sdpa
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_with_kvcache

        out["flash_attn"] = lambda q, kc, vc, lens, bt, L: flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens, block_table=bt
        )
    else:
        out["flash_attn"] = "not installed" if device == "cuda" else "GPU only"
    out["flashinfer"] = (
        "GPU only"
        if device != "cuda"
        else "not installed"
        if importlib.util.find_spec("flashinfer") is None
        else "installed but not wired up yet"
    )
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
    if _alloc(case) == "torch":
        k_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
        v_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
    else:
        k_cache = zeros_kv_cache(shape, dtype=dtype, device=device).normal_(generator=g)
        v_cache = zeros_kv_cache(shape, dtype=dtype, device=device).normal_(generator=g)
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
    ref = decode_attention_ref(
        q.double(),
        k_cache.double(),
        v_cache.double(),
        cache_seqlens=seqlens,
        block_table=block_table,
        compute_dtype=torch.float64,
    )
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
    cp = copy_gbps(r.case)
    return f"{r.metric / cp:.0%}" if cp and r.metric else "-"


extra_columns = [
    ("copy GB/s", lambda r: f"{copy_gbps(r.case):.1f}" if copy_gbps(r.case) else "-"),
    ("% of copy", fraction_of_copy),
]


def format_row(r: Row, rows: list[Row]) -> str:
    c = r.case
    head = (
        f"{c['dtype']:5s} {c['layout']:10s} {_alloc(c):9s} B={c['B']:2d} Hq={c['Hq']} "
        f"Hkv={c['Hkv']:2d} D={c['D']} L={c['L']:6d}"
    )
    if r.status != "ok":
        return f"{head} {r.backend:11s} {r.status}"
    ours = next((x for x in rows if x.case == c and x.backend == "fusedattn" and x.status == "ok"), None)
    ratio = f"{r.median_ms / ours.median_ms:6.2f}x vs ours" if ours and r.backend != "fusedattn" else ""
    cp = copy_gbps(c)
    return (
        f"{head} {r.backend:11s} {r.median_ms:9.3f} ms [{r.min_ms:.3f}..{r.max_ms:.3f}] {r.metric:6.1f} GB/s "
        f"({fraction_of_copy(r):>4s} of {cp or 0:.1f} GB/s copy) err {r.max_err:.1e} {ratio}"
    )


def plot(rows: list[Row], info: dict, out_dir: str, tag: str) -> list[str]:
    """GB/s vs cache length, one line per backend, one panel per (dtype, layout, B, Hkv); the copy bandwidth
    as a dashed line (the median of the copies timed beside the cases)."""
    cps = [v for v in (copy_gbps(r.case) for r in rows) if v]
    cp = statistics.median(cps) if cps else None
    return plot_vs_length(
        rows,
        info,
        out_dir,
        tag,
        family="decode",
        group=lambda c: (c["dtype"], c["layout"], _alloc(c), c["B"], c["Hkv"]),
        title=lambda g: f"{g[0]} {g[1]} ({g[2]} alloc) B={g[3]} Hkv={g[4]}",
        xlabel="cache length",
        ylabel="GB/s",
        hline=(cp, "copy bandwidth") if cp else None,
    )
