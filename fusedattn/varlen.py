"""Variable-length (packed) attention: ``varlen_attention``, FlashAttention's ``flash_attn_varlen_func``.

Sequences of different lengths are packed along the token dimension, without padding: q (total_q, Hq, D),
k (total_k, Hkv, D), v (total_k, Hkv, Dv), and sequence b owns rows ``cu_seqlens[b] .. cu_seqlens[b+1] - 1``.
Arguments are validated here, once (fusedattn/checks.py), with ValueErrors that name the argument; then the op
of the backend fusedattn/dispatch.py resolves runs: ``"cpu"`` (``torch.ops.fusedattn.varlen_fwd``, C++),
``"triton"`` (``torch.ops.fusedattn.triton_varlen_fwd``, kernels/attention.py) or ``"reference"``
(fusedattn/reference.py).

The value checks on ``cu_seqlens`` (start at 0, non-decreasing, end at the token count, no length above
``max_seqlen``) read the small index tensors, which for CUDA tensors costs one device synchronization. Under
``torch.compile`` they are skipped, since they would break the graph; the C++ op repeats them before touching
memory, so a bad index still raises (a RuntimeError) instead of reading out of bounds.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, dispatch
from .sinks import apply_sinks

__all__ = ["varlen_attention"]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over packed variable-length sequences (FlashAttention's ``flash_attn_varlen_func``).

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv). ``Hq % Hkv == 0`` (GQA/MQA: query
            head h reads kv head ``h // (Hq // Hkv)``; K/V are never expanded). Any strides (e.g. slices of a
            packed qkv tensor).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 on q's device, cumulative lengths: ``cu[0] = 0``,
            non-decreasing, ``cu[B]`` = total_q / total_k. Sequence b is rows ``cu[b] .. cu[b+1] - 1``; its
            query and key lengths may differ and may be 0.
        max_seqlen_q, max_seqlen_k: ints, at least every query / key length (GPU kernels size their grids
            with them).
        causal: per sequence, bottom-right aligned when its Lq != Lk: query i sees keys ``j <= i + Lk - Lq``.
        scale: multiplies q.k; default ``1/sqrt(D)``.
        window: (left, right) sliding window around the same diagonal, -1 = unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        sinks: (Hq,) float, optional: attention sinks (gpt-oss), as in ``fusedattn.attention``. Differentiable.
        return_lse: also return the log-sum-exp of each row's scores, (Hq, total_q) float32 (FlashAttention's
            varlen layout; with sinks: of the scores and the sink).
        backend: "auto", "cpu", "triton" or "reference" (see fusedattn.dispatch).

    Returns:
        out (total_q, Hq, Dv) in q's dtype, and lse if ``return_lse``. A query that sees no key (its
        sequence has no keys, or the window hides them all) gives 0 and lse -inf (never NaN).
        Differentiable in q, k, v (and through lse).
    """
    left, right = checks.check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, softcap
    )
    checks.check_sinks(sinks, q, q.shape[1])
    if not torch.compiler.is_compiling():
        checks.check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", max_seqlen_q, "max_seqlen_q")
        checks.check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", max_seqlen_k, "max_seqlen_k")
    case = dispatch.Case(q.device, q.dtype, q.shape[-1], v.shape[-1], softcap=softcap)
    op = dispatch.resolve("varlen", backend, case).op
    out, lse = op(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        checks.default_scale(scale, q.shape[-1]),
        left,
        0 if causal else right,
        True,
        float(softcap),
    )
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks, "varlen")
    return (out, lse) if return_lse else out
