"""Variable-length (packed) attention: ``varlen_attention``, FlashAttention's ``flash_attn_varlen_func``.

Sequences of different lengths are packed along the token dimension, without padding: q (total_q, Hq, D),
k (total_k, Hkv, D), v (total_k, Hkv, Dv), and sequence b owns rows ``cu_seqlens[b] .. cu_seqlens[b+1] - 1``.
Arguments are validated here, once, with ValueErrors that name the argument; then a backend chosen in
fusedattn/dispatch.py runs: ``"cpu"`` (``torch.ops.fusedattn.varlen_fwd``, C++), ``"triton"``
(``fusedattn.kernels.attention.varlen_attention``) or ``"reference"`` (fusedattn/reference.py).

The value checks on ``cu_seqlens`` (start at 0, non-decreasing, end at the token count, no length above
``max_seqlen``) read the small index tensors, which for CUDA tensors costs one device synchronization. Under
``torch.compile`` they are skipped, since they would break the graph; the C++ op repeats them before touching
memory, so a bad index still raises (a RuntimeError) instead of reading out of bounds.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dispatch
from .api import _check_tensor, _default_scale, _validate_scalars
from .reference import varlen_attention_ref

__all__ = ["varlen_attention"]


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _check_cu_seqlens(name: str, cu, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be an int32 tensor, got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of shape (B + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")


def _check_max_seqlen(name: str, m) -> None:
    if not isinstance(m, int) or isinstance(m, bool) or m < 0:
        raise ValueError(f"{name} must be an int >= 0, got {m!r}")


def _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window,
                     softcap) -> Tuple[int, int]:
    """Checks shapes, dtypes, devices and scalars; returns the normalized window (left, right)."""
    for name, t, layout in (("q", q, "(total_q, Hq, D)"), ("k", k, "(total_k, Hkv, D)"),
                            ("v", v, "(total_k, Hkv, Dv)")):
        _check_tensor(name, t, ndim=3, layout=layout)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    total_q, Hq, D = q.shape
    if k.shape[2] != D:
        raise ValueError(f"k head dim {k.shape[2]} != q head dim {D} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must have k's tokens and heads: k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads in q ({Hq}) must be a multiple of the number of key/value "
                         f"heads in k and v ({Hkv})")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    return _validate_scalars(scale, window, softcap)


def _check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int, tensor_name: str, max_seqlen: int,
                             max_name: str) -> None:
    """The value checks: every row the kernels will touch exists. Reads the (small) index tensor, so it runs
    eagerly only (see the module docstring)."""
    c = cu.to("cpu", torch.int64)  # (B + 1,)
    if int(c[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(c[0])}")
    lens = c[1:] - c[:-1]  # (B,)
    bad = (lens < 0).nonzero()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(f"{name} must be non-decreasing, got {name}[{b}] = {int(c[b])} > {name}[{b + 1}] = "
                         f"{int(c[b + 1])}")
    if int(c[-1]) != total:
        raise ValueError(f"the last entry of {name} ({int(c[-1])}) must equal the number of tokens in "
                         f"{tensor_name} ({total})")
    over = (lens > max_seqlen).nonzero()
    if over.numel():
        b = int(over[0])
        raise ValueError(f"{max_name} = {max_seqlen} is less than the length {int(lens[b])} of sequence {b} in "
                         f"{name}")


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: Optional[float] = None, window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     return_lse: bool = False, backend: str = "auto"):
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
        return_lse: also return the log-sum-exp of each row's scores, (Hq, total_q) float32 (FlashAttention's
            varlen layout).
        backend: "auto", "cpu", "triton" or "reference" (see fusedattn.dispatch).

    Returns:
        out (total_q, Hq, Dv) in q's dtype, and lse if ``return_lse``. A query that sees no key (its
        sequence has no keys, or the window hides them all) gives 0 and lse -inf (never NaN).
        Differentiable in q, k, v (and through lse).
    """
    left, right = _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window,
                                   softcap)
    if not torch.compiler.is_compiling():
        _check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", max_seqlen_q, "max_seqlen_q")
        _check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", max_seqlen_k, "max_seqlen_k")
    scale = _default_scale(scale, q.shape[-1])
    if causal:
        right = 0
    name = dispatch.select_backend(backend, q.device, q.dtype)
    if name == "cuda":  # no CUDA C++ varlen kernel: the Triton one, or the reference, visibly
        if backend == "cuda":
            raise RuntimeError("fusedattn backend 'cuda' has no varlen kernel; use backend='triton' or 'auto'")
        reason = dispatch.available_backends()["triton"]
        if reason is None:
            name = "triton"
        else:
            dispatch.warn_fallback(f"no CUDA varlen kernel, and triton: {reason}",
                                   target="the reference implementation")
            name = "reference"
    if name == "reference":
        out, lse = varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        causal=causal, scale=scale, window=(left, right), softcap=softcap,
                                        return_lse=True)
    elif name == "triton":
        from fusedattn.kernels.attention import varlen_attention as triton_varlen_attention

        out, lse = triton_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           scale=scale, causal=causal, window=(left, right), softcap=float(softcap))
    else:
        out, lse = torch.ops.fusedattn.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  scale, left, right, True, float(softcap))
    return (out, lse) if return_lse else out
