"""KV-cache decoding: ``decode_attention`` and ``merge_attention_states``.

``decode_attention`` follows FlashAttention's ``flash_attn_with_kvcache`` (layout, in-place append, paged
block tables, bottom-right causal). Arguments are validated here, once (fusedattn/checks.py), with ValueErrors
that name the argument; then the op of the backend fusedattn/dispatch.py resolves runs: ``"cpu"``
(``torch.ops.fusedattn.decode_fwd``, C++), ``"cuda"`` (the same op on CUDA tensors, csrc/cuda/decode.cuh),
``"triton"`` (``torch.ops.fusedattn.triton_decode_fwd``, kernels/decode.py: GPU tensors, or CPU tensors under
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

from typing import Optional, Tuple, Union

import torch

from . import checks, dispatch
from .rotary import apply_rotary
from .sinks import apply_sinks

__all__ = ["decode_attention", "merge_attention_states"]


def _cache_rows_aligned(*caches: torch.Tensor) -> bool:
    """Every row of the caches starts on a 16-byte boundary (what the CUDA kernel's cp.async needs). While
    torch.compile traces, neither data_ptr() nor storage_offset() traces: only the strides are checked there, and
    the start of the cache is assumed aligned (as every allocation of torch's is)."""
    compiling = torch.compiler.is_compiling()
    for t in caches:
        if t.numel() == 0:
            continue
        if (not compiling and t.data_ptr() % 16) or any(st % 8 for st, n in zip(t.stride()[:-1], t.shape) if n > 1):
            return False
    return True


def _rotate(q, k_new, cache_seqlens, cos, sin, interleaved: bool, causal: bool, window):
    """q and k_new rotated at their cache positions (flash_attn_with_kvcache's rule, see decode_attention)."""
    B, Lq, Lnew = q.shape[0], q.shape[1], k_new.shape[1]
    per_row = causal or tuple(window) != (-1, -1)
    if not torch.compiler.is_compiling():
        checks.check_rotary_positions(cos, cache_seqlens, max(Lnew, Lq if per_row else 1))
    start = cache_seqlens.to(torch.int64)[:, None]  # (B, 1)
    pos_k = start + torch.arange(Lnew, device=q.device)  # (B, Lnew)
    pos_q = start + torch.arange(Lq, device=q.device) if per_row else start.expand(B, Lq)
    return apply_rotary(q, cos, sin, pos_q, interleaved), apply_rotary(k_new, cos, sin, pos_k, interleaved)


def _leftpad_as_pages(k_cache, v_cache, cache_seqlens, leftpad, cache_batch_idx):
    """A left-padded contiguous cache as a paged one with PAGE_SIZE 1: page p of the view is the position at element
    offset p * stride(1), so position j of cache row r is page r * (stride(0) / stride(1)) + j, and sequence b's
    logical key i is page row_b * rstride + leftpad_b + i. Lengths become cache_seqlens - leftpad."""
    B, L_max = cache_seqlens.shape[0], k_cache.shape[1]
    views = []
    for t in (k_cache, v_cache):
        s0, s1 = t.stride(0), t.stride(1)
        pages = (t.shape[0] - 1) * (s0 // s1) + L_max if t.shape[0] else 0
        views.append(t.as_strided((pages, 1, t.shape[2], t.shape[3]), (s1, s1, t.stride(2), t.stride(3))))
    rows = torch.arange(B, device=k_cache.device) if cache_batch_idx is None else cache_batch_idx.to(torch.int64)
    first = rows * (k_cache.stride(0) // k_cache.stride(1)) + leftpad.to(torch.int64)  # (B,)
    j = torch.arange(L_max, device=k_cache.device)
    table = (first[:, None] + torch.minimum(j, (L_max - 1 - leftpad.to(torch.int64))[:, None])).to(torch.int32)
    return views[0], views[1], table, cache_seqlens - leftpad


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: Union[torch.Tensor, int],
    k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    num_splits: int = 0,
    sinks: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    rotary_interleaved: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
):
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
        cache_leftpad: (B,) int32, optional (contiguous cache): sequence b's keys start at position
            ``cache_leftpad[b]`` (a left-padded batch); positions before it are never read. ``cache_seqlens`` stays
            the end position (where the append writes), so the sequence holds ``cache_seqlens - cache_leftpad``
            keys; causal and window align on them. Served by the paged kernels over a page-size-1 view of the
            cache (no copy; a (B, L_max) int32 block table is built per call).
        causal: bottom-right aligned over the sequence after the append (Lk = cache_seqlens[b] + Lnew): query i
            sees keys ``j <= Lk - Lq + i``.
        scale: multiplies q.k; default ``1/sqrt(D)``.
        window: (left, right) sliding window around the same diagonal, -1 = unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        num_splits: split each sequence's keys into this many chunks processed in parallel and merged by
            log-sum-exp (split-KV); 0 picks a count from the sequence lengths, B * Hkv and the thread count
            (Triton: from the cache capacity, B * Hkv and the SM count; see kernels/decode.py).
            Results agree across split counts up to rounding.
        sinks: (Hq,) float, optional: attention sinks (gpt-oss), as in ``fusedattn.attention``; joined once, after
            the splits are merged.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), optional (with k_new): rotary embedding applied
            before the append, as flash_attn_with_kvcache does: k_new row i of sequence b at position
            ``cache_seqlens[b] + i``; q likewise when causal or windowed, else every q row at
            ``cache_seqlens[b]``. The first rotary_dim dims of each head rotate; k_new itself is not modified.
        rotary_interleaved: False (default): GPT-NeoX / Llama pairs (i, i + rotary_dim/2); True: GPT-J pairs
            (2i, 2i+1) (flash-attn's default). See fusedattn.rotary.
        return_lse: also return the log-sum-exp of each query row's scores, (B, Hq, Lq) float32 (with sinks: of
            the scores and the sink).
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see fusedattn.dispatch). "auto": "cpu" for CPU
            tensors; for CUDA tensors the CUDA kernel where it covers the call (float16 / bfloat16, head dim 64,
            128 or 256, Dv == D, 16-byte aligned cache rows), else Triton's.

    Returns:
        out (B, Lq, Hq, Dv) in q's dtype, and lse if ``return_lse``. A query that sees no key (an empty
        sequence) gives output 0 and lse -inf.

    Raises:
        ValueError for a bad argument (naming it); RuntimeError, as torch's own in-place writes, where the append
        cannot be done safely: a cache with internal overlap (``expand()``-ed), caches sharing memory, ``k_new`` /
        ``v_new`` a view into a cache, an inference-mode cache outside ``torch.inference_mode()``, or a tensor whose
        storage no longer holds its view (freed by ``untyped_storage().resize_(0)``). The append bumps the caches'
        version counters, as torch's in-place ops do.
    """
    checks.check_float_tensor("q", q, 4, "(B, Lq, Hq, D)")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    checks.check_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx)
    checks.check_scale(scale)
    checks.check_softcap(softcap)
    left, right = checks.check_window(window)
    checks.check_num_splits(num_splits)
    checks.check_sinks(sinks, q, q.shape[2])
    checks.check_rotary(rotary_cos, rotary_sin, q, k_new)
    checks.refuse_grad("decode_attention", q, k_cache, v_cache, k_new, v_new, sinks)
    # The append's aliasing and in-place rules (eager, concrete tensors), RuntimeErrors as torch's own (the C++ and
    # Triton ops repeat them; the reference relies on these). check_decode checked every view against its storage.
    checks.check_append(k_cache, v_cache, k_new, v_new)
    if not torch.compiler.is_compiling():
        checks.check_decode_indices(
            k_cache, cache_seqlens, 0 if k_new is None else k_new.shape[1], block_table, cache_batch_idx
        )
    if rotary_cos is not None:  # at the physical positions, as flash-attn (with or without cache_leftpad)
        q, k_new = _rotate(q, k_new, cache_seqlens, rotary_cos, rotary_sin, rotary_interleaved, causal, window)
    if cache_leftpad is not None:
        checks.check_leftpad(cache_leftpad, cache_seqlens, k_cache, v_cache, block_table)
        k_cache, v_cache, block_table, cache_seqlens = _leftpad_as_pages(
            k_cache, v_cache, cache_seqlens, cache_leftpad, cache_batch_idx
        )
        cache_batch_idx = None
    case = dispatch.Case(
        q.device,
        q.dtype,
        q.shape[-1],
        v_cache.shape[-1],
        softcap=softcap,
        cache_aligned=_cache_rows_aligned(k_cache, v_cache),
    )
    op = dispatch.resolve("decode", backend, case).op
    out, lse = op(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new,
        v_new,
        block_table,
        cache_batch_idx,
        checks.default_scale(scale, q.shape[-1]),
        left,
        0 if causal else right,
        float(softcap),
        num_splits,
    )
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks, "blhd")
    return (out, lse) if return_lse else out


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    layout: str = "blhd",
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states over disjoint key sets into the state over their union.

    Args:
        out_a, out_b: attention outputs (each normalized over its own keys): (B, L, H, D) with ``layout="blhd"``
            (decode_attention's, flash-attn's), (B, H, L, D) with ``layout="bhld"`` (attention()'s). Said
            explicitly: the shapes cannot tell the two apart when H == L.
        lse_a, lse_b: (B, H, L) float32 log-sum-exps of the scores behind them (as returned with
            ``return_lse=True``), in either layout.
        out_dtype: None: out_a and out_b share a dtype, which the result keeps. A dtype (e.g. torch.float32):
            both outputs are cast to it first (they may then differ, e.g. an fp32 running state and a bf16 block)
            and the result is in it, so a ring of many merges does not round through bf16 at every step.
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        (out in out_a's layout and dtype (``out_dtype`` when given), lse (B, H, L) float32), with
        M = max(lse_a, lse_b), ``out = (e^(lse_a-M) out_a + e^(lse_b-M) out_b) / (e^(lse_a-M) + e^(lse_b-M))``
        and ``lse = M + log(e^(lse_a-M) + e^(lse_b-M))``. A side with lse -inf contributes nothing; both -inf
        give out 0 and lse -inf.
    """
    if layout not in ("blhd", "bhld"):
        raise ValueError(f'layout must be "blhd" (B, L, H, D) or "bhld" (B, H, L, D), got {layout!r}')
    if out_dtype is not None:
        if out_dtype not in dispatch.FUSED_DTYPES:
            raise ValueError(f"out_dtype must be None or one of {dispatch.FUSED_DTYPES}, got {out_dtype!r}")
        out_a, out_b = (t.to(out_dtype) if isinstance(t, torch.Tensor) else t for t in (out_a, out_b))
    if layout == "bhld":  # the kernels read (B, L, H, D) with any strides: views, no copies
        out_a, out_b = (
            t.transpose(1, 2) if isinstance(t, torch.Tensor) and t.dim() == 4 else t for t in (out_a, out_b)
        )
    checks.check_merge(out_a, lse_a, out_b, lse_b)
    checks.refuse_grad("merge_attention_states", out_a, lse_a, out_b, lse_b)
    D = out_a.shape[-1]
    op = dispatch.resolve("merge", backend, dispatch.Case(out_a.device, out_a.dtype, D, D)).op
    out, lse = op(out_a, lse_a, out_b, lse_b)
    return (out.transpose(1, 2), lse) if layout == "bhld" else (out, lse)
