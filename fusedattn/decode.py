"""KV-cache decoding: ``decode_attention`` and ``merge_attention_states``.

``decode_attention`` follows FlashAttention's ``flash_attn_with_kvcache`` (layout, in-place append, paged
block tables, bottom-right causal). Arguments are validated here, once, with ValueErrors that name the
argument; then a backend chosen in fusedattn/dispatch.py runs: ``"cpu"`` (``torch.ops.fusedattn.decode_fwd``,
C++), ``"cuda"`` (the same op on CUDA tensors, csrc/cuda/decode.cuh), ``"triton"``
(``torch.ops.fusedattn.triton_decode_fwd``, kernels/decode.py: GPU tensors, or CPU tensors under
``TRITON_INTERPRET=1``) or ``"reference"`` (fusedattn/reference.py).

Decoding is inference-only: the ops have no backward, and inputs that require grad are refused while grad
mode is on (use ``torch.no_grad()`` or ``torch.inference_mode()``).

Under ``torch.compile`` the checks that read tensor values (cache_seqlens, block_table and cache_batch_idx
ranges) are skipped, since they would break the graph; the C++ op repeats them before touching memory, so a
bad index still raises (a RuntimeError) instead of reading or writing out of bounds. The Triton op repeats them
on CPU tensors (interpreter); on a GPU (and while traced) its kernels refuse a bad index themselves: nothing
outside the tensors is touched, the sequence's append is skipped and its output and lse are NaN. The CUDA op does
not read the indices on the host (that would synchronize); its kernels clamp lengths to the cache capacity and read
a page or cache row out of range as zeros: wrong numbers, but no memory it does not own is touched.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from . import dispatch
from .api import _default_scale
from .reference import decode_attention_ref, merge_attention_states_ref

__all__ = ["decode_attention", "merge_attention_states"]

MAX_SPLITS = 1024  # the C++ op's bound on num_splits

# The Triton ops (torch.ops.fusedattn.triton_decode_fwd / triton_merge_attention_states) are registered by
# importing kernels/decode.py, done here once when dispatch says Triton can run (so that torch.compile finds
# them registered before it traces a call).
_TRITON_IMPORT_ERROR: Optional[str] = None
if dispatch.available_backends()["triton"] is None:
    try:
        from fusedattn.kernels import decode as _triton_decode  # noqa: F401
    except Exception as e:  # a broken triton install must not break `import fusedattn`
        _TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    _TRITON_IMPORT_ERROR = dispatch.available_backends()["triton"]


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _check_float4d(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")


def _check_like(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.dtype != q.dtype:
        raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _check_int32(name: str, t, shape: Tuple[int, ...], layout: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be an int32 tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    if t.dim() != len(shape) or any(s is not None and t.shape[d] != s for d, s in enumerate(shape)):
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def _validate_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx, scale,
                     window, softcap, num_splits) -> Tuple[torch.Tensor, int, int]:
    """Checks shapes, dtypes, devices and scalars; returns (cache_seqlens as an int32 tensor, left, right)."""
    _check_float4d("q", q, "(B, Lq, Hq, D)")
    B, Lq, Hq, D = q.shape
    paged = block_table is not None
    layout = "(num_blocks, PAGE_SIZE, Hkv, D)" if paged else "(B_cache, L_max, Hkv, D)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float4d(name, t, layout)
        _check_like(name, t, q)
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension, got strides {t.stride()}")
    Hkv = k_cache.shape[2]
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must match k_cache in all but the head dim: k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} != q head dim {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads in q ({Hq}) must be a multiple of the number of kv heads in "
                         f"k_cache ({Hkv})")

    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    _check_int32("cache_seqlens", cache_seqlens, (B,), f"(B,) = ({B},)", q.device)

    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (or both left None)")
    if k_new is not None:
        _check_float4d("k_new", k_new, "(B, Lnew, Hkv, D)")
        _check_float4d("v_new", v_new, "(B, Lnew, Hkv, Dv)")
        Lnew = k_new.shape[1]
        for name, t, dim in (("k_new", k_new, D), ("v_new", v_new, v_cache.shape[3])):
            _check_like(name, t, q)
            if tuple(t.shape) != (B, Lnew, Hkv, dim):
                raise ValueError(f"{name} must have shape (B, Lnew, Hkv, {'D' if name == 'k_new' else 'Dv'}) = "
                                 f"{(B, Lnew, Hkv, dim)}, got {tuple(t.shape)}")

    if paged:
        _check_int32("block_table", block_table, (B, None), f"(B, max_blocks) with B = {B}", q.device)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (a paged cache addresses "
                             "sequences through the block table)")
        if k_cache.shape[1] == 0:
            raise ValueError(f"a paged k_cache must have PAGE_SIZE > 0, got shape {tuple(k_cache.shape)}")
    if cache_batch_idx is not None:
        _check_int32("cache_batch_idx", cache_batch_idx, (B,), f"(B,) = ({B},)", q.device)
    elif not paged and k_cache.shape[0] < B:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences but q has batch {B} (pass cache_batch_idx "
                         f"to pick cache rows)")

    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"window must be a pair of ints (left, right), each >= 0 or -1 for unbounded, "
                         f"got {window!r}")
    if not (isinstance(num_splits, int) and not isinstance(num_splits, bool) and 0 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in [0, {MAX_SPLITS}] (0 = heuristic), got {num_splits!r}")
    return cache_seqlens, int(window[0]), int(window[1])


def _check_cache_indices(k_cache, cache_seqlens, Lnew, block_table, cache_batch_idx) -> None:
    """The value checks: every position and page the kernels will touch exists. Reads the (small) index
    tensors, so it runs eagerly only (see the module docstring)."""
    lens = cache_seqlens.tolist()  # (B,) ints: one small read (a sync on CUDA), then checks in Python
    if not lens:
        return
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if min(lens) < 0:
        b = next(i for i, x in enumerate(lens) if x < 0)
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{b}] = {lens[b]}")
    if max(lens) + Lnew > capacity:
        b = next(i for i, x in enumerate(lens) if x + Lnew > capacity)
        what = "max_blocks * PAGE_SIZE of block_table and k_cache" if paged else "L_max of k_cache"
        raise ValueError(f"cache_seqlens[{b}] + Lnew = {lens[b]} + {Lnew} = {lens[b] + Lnew} exceeds the "
                         f"cache capacity {capacity} ({what})")
    if paged:
        num_blocks, page_size = k_cache.shape[0], k_cache.shape[1]
        total = cache_seqlens.to(torch.int64) + Lnew  # (B,) keys after the append
        pages_used = (total + page_size - 1) // page_size  # (B,)
        touched = torch.arange(block_table.shape[1], device=total.device) < pages_used[:, None]  # (B, max_blocks)
        bad = (touched & ((block_table < 0) | (block_table >= num_blocks))).nonzero()
        if bad.numel():
            b, blk = (int(x) for x in bad[0])
            raise ValueError(f"block_table[{b}, {blk}] = {int(block_table[b, blk])} is out of range: sequence {b} "
                             f"uses pages 0..{int(pages_used[b]) - 1} of its row, each must be in [0, {num_blocks})")
    if cache_batch_idx is not None:
        idx = cache_batch_idx.tolist()
        bad = [i for i, x in enumerate(idx) if not 0 <= x < k_cache.shape[0]]
        if bad:
            raise ValueError(f"cache_batch_idx[{bad[0]}] = {idx[bad[0]]} is out of range for a cache of "
                             f"{k_cache.shape[0]} sequences")


def _refuse_grad(fn: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"{fn} is inference-only (it has no backward) but an input requires grad: call it under "
                         f"torch.no_grad() or torch.inference_mode(), or detach the inputs")


def _cuda_decode_reason(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> Optional[str]:
    """None when the CUDA decode kernel (csrc/cuda/decode.cuh) covers the call, else why not."""
    reason = dispatch.cuda_unsupported_reason(q.dtype, q.shape[-1], v_cache.shape[-1])
    if reason is None:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            # cp.async copies 16-byte rows of the cache in place (it is written to, so it cannot be copied)
            if t.numel() and (t.data_ptr() % 16 or any(st % 8 for st, n in zip(t.stride()[:-1], t.shape) if n > 1)):
                return f"{name} rows are not 16-byte aligned (strides {tuple(t.stride())})"
    return reason


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, cuda_reason=None) -> str:
    """cuda_reason: a callable giving why the CUDA kernel cannot take this call (None: it can)."""
    name = dispatch.select_backend(backend, device, dtype)
    if name == "triton" and _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"fusedattn backend 'triton' is unavailable: the decode kernels did not load "
                           f"({_TRITON_IMPORT_ERROR})")
    if name == "cuda":
        reason = cuda_reason() if cuda_reason is not None else None
        if reason is None:
            return name
        if backend == "cuda":
            raise RuntimeError(f"fusedattn backend 'cuda' does not cover this case: {reason}")
        if _TRITON_IMPORT_ERROR is None:  # "auto": Triton's kernel serves what the CUDA one does not
            return "triton"
        dispatch.warn_fallback(f"cuda: {reason}; triton: {_TRITON_IMPORT_ERROR}",
                               target="the reference implementation")
        return "reference"
    return name


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                     cache_seqlens: Union[torch.Tensor, int], k_new: Optional[torch.Tensor] = None,
                     v_new: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                     cache_batch_idx: Optional[torch.Tensor] = None, causal: bool = True,
                     scale: Optional[float] = None, window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     num_splits: int = 0, return_lse: bool = False, backend: str = "auto"):
    """Attention of a few new queries over a KV cache (FlashAttention's ``flash_attn_with_kvcache``).

    Args:
        q: (B, Lq, Hq, D). Lq = 1 for plain decoding, > 1 for speculative / chunked prefill (causal inside).
        k_cache, v_cache: contiguous (B_cache, L_max, Hkv, D) / (.., Dv), or paged (num_blocks, PAGE_SIZE, Hkv, D)
            with ``block_table``. Hq % Hkv == 0 (GQA / MQA: each kv head is read once for its query heads). The
            last dimension must be contiguous; any other strides.
        cache_seqlens: (B,) int32 (or an int for all sequences): keys already in the cache.
        k_new, v_new: (B, Lnew, Hkv, D) / (.., Dv), optional. Written **in place** into k_cache / v_cache at
            positions ``cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1`` before attending; the caller then
            advances ``cache_seqlens`` by Lnew.
        block_table: (B, max_blocks) int32: page ``block_table[b, j // PAGE_SIZE]`` holds key j of sequence b.
            Any PAGE_SIZE >= 1. Only the pages a sequence uses are read (the rest of its row may be anything).
        cache_batch_idx: (B,) int32: cache row of each sequence (contiguous cache), default ``arange(B)``.
        causal: bottom-right aligned over the sequence after the append (Lk = cache_seqlens[b] + Lnew): query i
            sees keys ``j <= Lk - Lq + i``.
        scale: multiplies q.k; default ``1/sqrt(D)``.
        window: (left, right) sliding window around the same diagonal, -1 = unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        num_splits: split each sequence's keys into this many chunks processed in parallel and merged by
            log-sum-exp (split-KV); 0 picks a count from the sequence lengths, B * Hkv and the thread count
            (Triton: from the cache capacity, B * Hkv and the SM count; see kernels/decode.py).
            Results agree across split counts up to rounding.
        return_lse: also return the log-sum-exp of each query row's scores, (B, Hq, Lq) float32.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see fusedattn.dispatch). "auto": "cpu" for CPU
            tensors; for CUDA tensors the CUDA kernel where it covers the call (float16 / bfloat16, head dim 64,
            128 or 256, Dv == D, 16-byte aligned cache rows), else Triton's.

    Returns:
        out (B, Lq, Hq, Dv) in q's dtype, and lse if ``return_lse``. A query that sees no key (an empty
        sequence) gives output 0 and lse -inf.
    """
    cache_seqlens, left, right = _validate_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table,
                                                  cache_batch_idx, scale, window, softcap, num_splits)
    _refuse_grad("decode_attention", q, k_cache, v_cache, k_new, v_new)
    if not torch.compiler.is_compiling():
        _check_cache_indices(k_cache, cache_seqlens, 0 if k_new is None else k_new.shape[1], block_table,
                             cache_batch_idx)
    scale = _default_scale(scale, q.shape[-1])
    name = _resolve_backend(backend, q.device, q.dtype, lambda: _cuda_decode_reason(q, k_cache, v_cache))
    if name == "triton":
        out, lse = torch.ops.fusedattn.triton_decode_fwd(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                         block_table, cache_batch_idx, scale, left,
                                                         0 if causal else right, float(softcap), num_splits)
    elif name == "reference":
        out, lse = decode_attention_ref(q, k_cache, v_cache, cache_seqlens=cache_seqlens, k_new=k_new, v_new=v_new,
                                        block_table=block_table, cache_batch_idx=cache_batch_idx, causal=causal,
                                        scale=scale, window=(left, right), softcap=softcap, return_lse=True)
    else:
        out, lse = torch.ops.fusedattn.decode_fwd(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table,
                                                  cache_batch_idx, scale, left, 0 if causal else right,
                                                  float(softcap), num_splits)
    return (out, lse) if return_lse else out


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                           backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states over disjoint key sets into the state over their union.

    Args:
        out_a, out_b: (B, L, H, D) attention outputs (each normalized over its own keys), one dtype.
        lse_a, lse_b: (B, H, L) float32 log-sum-exps of the scores behind them (as returned with
            ``return_lse=True``).
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        (out (B, L, H, D) in out_a's dtype, lse (B, H, L) float32), with M = max(lse_a, lse_b),
        ``out = (e^(lse_a-M) out_a + e^(lse_b-M) out_b) / (e^(lse_a-M) + e^(lse_b-M))`` and
        ``lse = M + log(e^(lse_a-M) + e^(lse_b-M))``. A side with lse -inf contributes nothing; both -inf
        give out 0 and lse -inf.
    """
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        _check_float4d(name, t, "(B, L, H, D)")
    if out_b.shape != out_a.shape or out_b.dtype != out_a.dtype or out_b.device != out_a.device:
        raise ValueError(f"out_b must match out_a in shape, dtype and device: out_a {out_a.dtype} "
                         f"{tuple(out_a.shape)} on {out_a.device}, out_b {out_b.dtype} {tuple(out_b.shape)} "
                         f"on {out_b.device}")
    B, L, H, _ = out_a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (B, H, L):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a float32 tensor of shape (B, H, L) = {(B, H, L)}, got {got}")
        if t.device != out_a.device:
            raise ValueError(f"{name} must be on out_a's device {out_a.device}, got {t.device}")
    _refuse_grad("merge_attention_states", out_a, lse_a, out_b, lse_b)
    name = _resolve_backend(backend, out_a.device, out_a.dtype, lambda: None)  # CUDA merge takes every dtype
    if name == "reference":
        return merge_attention_states_ref(out_a, lse_a, out_b, lse_b)
    if name == "triton":
        return torch.ops.fusedattn.triton_merge_attention_states(out_a, lse_a, out_b, lse_b)
    return torch.ops.fusedattn.merge_attention_states(out_a, lse_a, out_b, lse_b)
