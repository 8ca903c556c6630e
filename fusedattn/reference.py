"""Reference attention: the oracle for tests and the ``reference`` backend.

Plain PyTorch written to be read, not to be fast: the full score matrix is materialized, every mask is an
explicit boolean tensor, and the arithmetic runs in ``compute_dtype`` (float32 by default, float64 for the
tests' ground truth, or the input dtype for the "same precision" baseline of the 2x tolerance rule).

Semantics (shared by every fusedattn kernel):

* Layout is (B, H, L, D). q: (B, Hq, Lq, D), k: (B, Hkv, Lk, D), v: (B, Hkv, Lk, Dv); Dv may differ from D.
* GQA / MQA: Hq % Hkv == 0 and query head h reads kv head h // (Hq // Hkv)
  (``repeat_interleave`` semantics, the same as ``F.scaled_dot_product_attention(..., enable_gqa=True)``).
* scores = (q @ k^T) * scale, scale defaults to 1 / sqrt(D).
* softcap > 0: scores = softcap * tanh(scores / softcap), applied before any mask (as in FlashAttention).
* Causal and sliding-window masks are measured from one diagonal. With ``causal_align="bottom_right"``
  (FlashAttention's convention, the default) the last query row lines up with the last key, i.e. the
  diagonal is offset by ``off = Lk - Lq``; with ``"top_left"`` (``is_causal`` in torch's SDPA) ``off = 0``.
  For window = (left, right), -1 meaning unbounded, query i sees key j iff

      i + off - left <= j <= i + off + right

  and ``causal=True`` sets right = 0 (keeping any left window).
* attn_mask broadcasts to (B, Hq, Lq, Lk) like SDPA's: bool (True = keep) or float (added to the scores,
  after the softcap).
* A row with no visible key (or whose scores are all -inf) returns 0 and lse = -inf, never NaN. NaN in the
  inputs is not sanitized: it propagates to every row whose visible scores it touches.
* dropout_p > 0 zeroes probabilities with probability dropout_p and scales the rest by 1 / (1 - dropout_p),
  drawing from ``generator`` when given. The lse is that of the undropped softmax.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "attention_ref",
    "make_window_mask",
    "varlen_attention_ref",
    "decode_attention_ref",
    "merge_attention_states_ref",
]

_ALIGNS = ("bottom_right", "top_left")


def _check_window(window: Tuple[int, int]) -> Tuple[int, int]:
    if len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    left, right = (int(w) for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window entries must be >= 0 or -1 (unbounded), got {window!r}")
    return left, right


def make_window_mask(
    Lq: int,
    Lk: int,
    causal: bool = False,
    causal_align: str = "bottom_right",
    window: Tuple[int, int] = (-1, -1),
    device: Optional[Union[torch.device, str]] = None,
) -> torch.Tensor:
    """Boolean visibility mask (Lq, Lk) for causal / sliding-window attention; True = query i sees key j.

    ``causal_align`` picks the diagonal: "bottom_right" offsets it by Lk - Lq (the last query sees every key),
    "top_left" does not (query i sees keys 0..i). ``window=(left, right)`` keeps keys with
    ``i + off - left <= j <= i + off + right``; -1 leaves that side unbounded; ``causal=True`` forces right = 0.
    """
    if causal_align not in _ALIGNS:
        raise ValueError(f"causal_align must be one of {_ALIGNS}, got {causal_align!r}")
    left, right = _check_window(window)
    if causal:
        right = 0
    off = Lk - Lq if causal_align == "bottom_right" else 0
    # A side of Lq + Lk or more hides no key (|i + off - j| < Lq + Lk): unbounded. Mapping it to -1 also keeps
    # i + off + right from overflowing int64 for sides near 2**63 (sys.maxsize as "unbounded").
    left, right = (-1 if w >= Lq + Lk else w for w in (left, right))
    i = torch.arange(Lq, device=device).unsqueeze(1)  # (Lq, 1)
    j = torch.arange(Lk, device=device).unsqueeze(0)  # (1, Lk)
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i + off - left
    if right >= 0:
        visible &= j <= i + off + right
    return visible


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    causal_align: str = "bottom_right",
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
    sinks: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention computed the obvious way (see the module docstring for the exact semantics).

    Args:
        q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv), any floating dtype.
        attn_mask: bool (True = keep) or float additive mask, broadcastable to (B, Hq, Lq, Lk).
        causal, causal_align, window: causal / sliding-window visibility, see ``make_window_mask``.
        scale: score scale, default 1 / sqrt(D).
        softcap: if > 0, scores = softcap * tanh(scores / softcap) before masking.
        dropout_p: dropout on the probabilities, drawn from ``generator``.
        return_lse: also return the log-sum-exp of the (scaled, capped, masked) scores per query row.
        compute_dtype: dtype of every intermediate; inputs are cast to it.
        sinks: (Hq,) attention sinks (gpt-oss): one logit per query head, appended to every row's scores as an
            extra column that joins the softmax (not scaled, capped or masked) and has no value vector.

    Returns:
        out (B, Hq, Lq, Dv) in q.dtype, and with ``return_lse`` the lse (B, Hq, Lq) in float32
        (float64 when ``compute_dtype`` is float64). Rows with no visible key give out = 0, lse = -inf (with
        sinks: out = 0, lse = the sink). The lse includes the sink.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, Dv = v.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"number of query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    # GQA: query head h reads kv head h // group.
    group = Hq // Hkv
    qc = q.to(compute_dtype)  # (B, Hq, Lq, D)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=1)  # (B, Hq, Lk, D)
    vc = v.to(compute_dtype).repeat_interleave(group, dim=1)  # (B, Hq, Lk, Dv)

    scores = (qc @ kc.transpose(-2, -1)) * scale  # (B, Hq, Lq, Lk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    visible = None  # bool, broadcastable to (B, Hq, Lq, Lk)
    if causal or tuple(window) != (-1, -1):
        visible = make_window_mask(Lq, Lk, causal, causal_align, window, device=q.device)
    if attn_mask is not None:
        try:
            torch.broadcast_shapes(attn_mask.shape, scores.shape)
        except RuntimeError as e:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {tuple(scores.shape)}"
            ) from e
        if attn_mask.dtype == torch.bool:
            visible = attn_mask if visible is None else visible & attn_mask
        else:
            scores = scores + attn_mask.to(compute_dtype)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        if sinks.shape != (Hq,):
            raise ValueError(f"sinks must have shape (Hq,) = ({Hq},), got {tuple(sinks.shape)}")
        sink_col = sinks.to(compute_dtype).view(1, Hq, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_col], dim=-1)  # (B, Hq, Lq, Lk + 1)

    # Softmax with a finite shift. The max is detached: softmax and lse are shift invariant, so gradients are
    # unchanged, and a fully masked row (max = -inf) shifts by 0 so that exp gives 0 instead of NaN. NaN
    # scores make the max NaN, which propagates to the row's output on purpose.
    if scores.shape[-1] > 0:
        row_max = scores.detach().amax(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    else:
        row_max = scores.new_full((B, Hq, Lq, 1), float("-inf"))
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    exp_scores = torch.exp(scores - row_max)  # (B, Hq, Lq, Lk)
    row_sum = exp_scores.sum(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    # Dividing by a safe denominator (rather than masking the quotient) keeps the backward free of 0/0.
    empty_row = row_sum == 0
    safe_sum = torch.where(empty_row, torch.ones_like(row_sum), row_sum)
    probs = exp_scores / safe_sum  # (B, Hq, Lq, Lk), exactly 0 on fully masked rows

    lse = torch.log(safe_sum) + row_max
    lse = lse.masked_fill(empty_row, float("-inf")).squeeze(-1)  # (B, Hq, Lq)
    if sinks is not None:
        probs = probs[..., :Lk]  # the sink's column has no value

    if dropout_p > 0:
        if dropout_p == 1.0:
            probs = torch.zeros_like(probs)
        else:
            keep = torch.rand(probs.shape, generator=generator, device=probs.device) >= dropout_p
            probs = probs * keep / (1.0 - dropout_p)

    out = (probs @ vc).to(q.dtype)  # (B, Hq, Lq, Dv)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)


# ------------------------------------------------------------------------------------------------------------------
# Variable-length (packed) attention
# ------------------------------------------------------------------------------------------------------------------


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    sinks: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over packed sequences with FlashAttention's ``flash_attn_varlen_func`` semantics, one sequence
    at a time through ``attention_ref``.

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) cumulative lengths, cu[0] = 0: sequence b owns rows
            ``cu[b] .. cu[b+1] - 1``. Lengths may be 0 and may differ between q and k.
        max_seqlen_q, max_seqlen_k: unused here (the kernels size their grids with them); accepted so that the
            reference takes the same arguments as ``fusedattn.varlen_attention``.
        causal, window: per sequence, bottom-right aligned: with Lq, Lk the sequence's lengths, query i sees key
            j iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (causal: right = 0).
        scale, softcap, compute_dtype, sinks: as in ``attention_ref``.

    Returns:
        out (total_q, Hq, Dv) in q.dtype, and with ``return_lse`` the lse (Hq, total_q) (FlashAttention's varlen
        layout) in float32 (float64 when ``compute_dtype`` is float64). A query that sees no key gives 0 and -inf.
        Differentiable in q, k, v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, H, D), got shape {tuple(t.shape)}")
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cu_q) != len(cu_k) or not cu_q:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1 >= 1, got {len(cu_q)} and {len(cu_k)}"
        )
    total_q, Hq, _ = q.shape
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
        kb = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, Lk, D)
        vb = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hkv, Lk, Dv)
        out, lse = attention_ref(
            qb,
            kb,
            vb,
            causal=causal,
            causal_align="bottom_right",
            scale=scale,
            window=window,
            softcap=softcap,
            return_lse=True,
            compute_dtype=compute_dtype,
            sinks=sinks,
        )
        outs.append(out[0].transpose(0, 1))  # (Lq, Hq, Dv)
        lses.append(lse[0])  # (Hq, Lq)
    out = torch.cat(outs) if outs else q.new_empty((0, Hq, v.shape[-1]))
    if out.shape[0] != total_q:
        raise ValueError(f"cu_seqlens_q covers {out.shape[0]} rows but q has {total_q}")
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1).to(lse_dtype) if lses else q.new_empty((Hq, 0), dtype=lse_dtype)
    return out, lse


# ------------------------------------------------------------------------------------------------------------------
# KV-cache decoding
# ------------------------------------------------------------------------------------------------------------------


def _cache_positions(
    cache: torch.Tensor,
    b: int,
    start: int,
    stop: int,
    block_table: Optional[torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (first, second) such that cache[first, second] are positions start..stop-1 of sequence b:
    (cache row, position) for a contiguous cache, (page, slot) for a paged one."""
    pos = torch.arange(start, stop, device=cache.device)
    if block_table is not None:
        page_size = cache.shape[1]
        return block_table[b].long()[pos // page_size], pos % page_size
    row = b if cache_batch_idx is None else int(cache_batch_idx[b])
    return torch.full_like(pos, row), pos


def rotary_ref(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int,
    interleaved: bool = False,
    same_position: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rotary embedding of one sequence's rows x (L, H, D) at positions start, start + 1, ... (all at ``start``
    with ``same_position``), written as a complex rotation: each pair (a, b) of the first rotary_dim = 2 *
    cos.shape[1] dims becomes (a + ib) * (cos + i sin) at its position. Pairs are (2i, 2i+1) when
    ``interleaved`` (GPT-J), else (i, i + rotary_dim/2) (GPT-NeoX). Returns x's dtype, computed in compute_dtype."""
    L, half = x.shape[0], cos.shape[1]
    pos = torch.full((L,), start) if same_position else torch.arange(start, start + L)
    cdt = torch.float64 if compute_dtype == torch.float64 else torch.float32  # complex needs a float32/64 base
    xr = x[..., : 2 * half].to(compute_dtype).to(cdt)
    if interleaved:
        pairs = xr.reshape(L, x.shape[1], half, 2)
    else:
        pairs = torch.stack((xr[..., :half], xr[..., half:]), dim=-1)  # (L, H, half, 2)
    z = torch.view_as_complex(pairs.contiguous())  # (L, H, half)
    turn = torch.complex(cos[pos].to(cdt), sin[pos].to(cdt))[:, None, :]  # (L, 1, half)
    r = torch.view_as_real(z * turn).to(compute_dtype)  # (L, H, half, 2)
    r = r.reshape(L, x.shape[1], 2 * half) if interleaved else torch.cat((r[..., 0], r[..., 1]), dim=-1)
    return torch.cat((r.to(x.dtype), x[..., 2 * half :]), dim=-1)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: Union[torch.Tensor, int],
    k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    sinks: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    rotary_interleaved: bool = False,
    cache_leftpad: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """KV-cache attention with FlashAttention's ``flash_attn_with_kvcache`` semantics, one sequence at a time
    through ``attention_ref``.

    Args:
        q: (B, Lq, Hq, D) queries (FlashAttention layout).
        k_cache, v_cache: contiguous (B_cache, L_max, Hkv, D) / (.., Dv), or paged (num_blocks, PAGE_SIZE, Hkv, D)
            when ``block_table`` (B, max_blocks) is given: position j of sequence b is
            ``cache[block_table[b, j // PAGE_SIZE], j % PAGE_SIZE]``.
        cache_seqlens: (B,) (or an int for all): keys already in the cache for each sequence.
        k_new, v_new: (B, Lnew, Hkv, D) / (.., Dv). Written **into the caches, in place**, at positions
            ``cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1`` before attending (sequences in order: if two write
            the same slot, the later one wins). ``cache_seqlens`` itself is not advanced.
        cache_batch_idx: (B,) cache row of each sequence (contiguous cache), default ``arange(B)``.
        causal, window: bottom-right aligned over the sequence after the append, Lk = cache_seqlens[b] + Lnew:
            query i (position Lk - Lq + i) sees key j iff ``Lk - Lq + i - left <= j <= Lk - Lq + i + right``.
        scale, softcap, compute_dtype, sinks: as in ``attention_ref``.
        rotary_cos, rotary_sin, rotary_interleaved: rotary embedding of k_new (row i of sequence b at position
            cache_seqlens[b] + i) and q (likewise when causal or windowed, else all at cache_seqlens[b]) before
            the append, see ``rotary_ref``.
        cache_leftpad: (B,) first valid position of each sequence (contiguous caches): its keys are positions
            cache_leftpad[b] .. cache_seqlens[b] + Lnew - 1, and causal / window align on them.

    Returns:
        out (B, Lq, Hq, Dv) in q.dtype, and with ``return_lse`` the lse (B, Hq, Lq). A query that sees no key
        (e.g. an empty sequence) gives output 0 and lse -inf.
    """
    B, Lq, Hq, _ = q.shape
    seqlens = [int(cache_seqlens)] * B if isinstance(cache_seqlens, int) else [int(x) for x in cache_seqlens.tolist()]
    Lnew = 0 if k_new is None else k_new.shape[1]
    if rotary_cos is not None:
        per_row = causal or tuple(window) != (-1, -1)
        rot = dict(cos=rotary_cos, sin=rotary_sin, interleaved=rotary_interleaved, compute_dtype=compute_dtype)
        k_new = torch.stack([rotary_ref(k_new[b], start=seqlens[b], **rot) for b in range(B)]) if B else k_new
        q = (
            torch.stack([rotary_ref(q[b], start=seqlens[b], same_position=not per_row, **rot) for b in range(B)])
            if B
            else q
        )
    if k_new is not None:
        for b in range(B):
            idx = _cache_positions(k_cache, b, seqlens[b], seqlens[b] + Lnew, block_table, cache_batch_idx)
            k_cache[idx] = k_new[b]  # (Lnew, Hkv, D)
            v_cache[idx] = v_new[b]  # (Lnew, Hkv, Dv)
    outs, lses = [], []
    for b in range(B):
        first = 0 if cache_leftpad is None else int(cache_leftpad[b])
        idx = _cache_positions(k_cache, b, first, seqlens[b] + Lnew, block_table, cache_batch_idx)
        k = k_cache[idx].permute(1, 0, 2).unsqueeze(0)  # (1, Hkv, Lk, D)
        v = v_cache[idx].permute(1, 0, 2).unsqueeze(0)  # (1, Hkv, Lk, Dv)
        out, lse = attention_ref(
            q[b].transpose(0, 1).unsqueeze(0),
            k,
            v,
            causal=causal,
            causal_align="bottom_right",
            scale=scale,
            window=window,
            softcap=softcap,
            return_lse=True,
            compute_dtype=compute_dtype,
            sinks=sinks,
        )  # (1, Hq, Lq, Dv), (1, Hq, Lq)
        outs.append(out[0].transpose(0, 1))  # (Lq, Hq, Dv)
        lses.append(lse[0])
    out = torch.stack(outs) if B else q.new_empty((0, Lq, Hq, v_cache.shape[-1]))
    if not return_lse:
        return out
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return out, torch.stack(lses) if B else q.new_empty((0, Hq, Lq), dtype=lse_dtype)


def merge_attention_states_ref(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states computed over disjoint key sets into the state over their union.

    out_x (B, L, H, D) is softmax attention over key set x and lse_x (B, H, L) its log-sum-exp. With
    M = max(lse_a, lse_b) and w_x = exp(lse_x - M):

        out = (w_a out_a + w_b out_b) / (w_a + w_b),   lse = M + log(w_a + w_b).

    A side with lse = -inf contributes nothing (its output is not read); both -inf gives out 0, lse -inf.
    Returns out in out_a.dtype and lse in float32 (float64 when compute_dtype is float64).
    """
    lse_a, lse_b = lse_a.to(compute_dtype), lse_b.to(compute_dtype)
    m = torch.maximum(lse_a, lse_b)  # (B, H, L)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w_a, w_b = torch.exp(lse_a - m_safe), torch.exp(lse_b - m_safe)
    w_sum = w_a + w_b
    lse = torch.where(w_sum == 0, torch.full_like(m, float("-inf")), m_safe + torch.log(w_sum))

    def weighted(w, o):  # w (B, H, L) -> (B, L, H, 1) against o (B, L, H, D); weight 0 never reads o
        w = w.transpose(1, 2).unsqueeze(-1)
        return torch.where(w > 0, w * o.to(compute_dtype), torch.zeros((), dtype=compute_dtype))

    denom = torch.where(w_sum == 0, torch.ones_like(w_sum), w_sum).transpose(1, 2).unsqueeze(-1)
    out = (weighted(w_a, out_a) + weighted(w_b, out_b)) / denom
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return out.to(out_a.dtype), lse.to(lse_dtype)
