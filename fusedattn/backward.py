"""The attention backward as an op of its own: ``torch.ops.fusedattn.attention_backward`` and its varlen twin.

Context-parallel engines (ring attention, flash-attn's ``_flash_attn_backward``) run the backward of one block of
keys with the caller's ``out`` and ``lse`` -- the *global* ones of the whole ring, not the block's own -- and
write dq / dk / dv into buffers they allocated. With P = exp(S - lse) and D = rowsum(dout * out), the fused
backward kernels compute exactly that block's share of the gradients:

    dv = P^T dout,   dS = P * (dout v^T - D),   dq = scale * dS k,   dk = scale * dS^T q   (summed over a GQA group)

so the blocks' dq add up to the full one, and each block's dk / dv is the full gradient of its keys.

    torch.ops.fusedattn.attention_backward(dout, q, k, v, out, lse, dq, dk, dv, scale, window_left,
                                           window_right, bottom_right, softcap, layout, backend) -> ()
        layout "blhd": q/dout/out/dq (B, Lq, Hq, D|Dv), k/v/dk/dv (B, Lk, Hkv, D|Dv) (flash-attn's);
               "bhld": (B, Hq, Lq, D) ... (attention()'s). lse (B, Hq, Lq) float32 in either layout.
    torch.ops.fusedattn.varlen_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q,
                                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                                                  window_right, softcap, backend) -> ()
        q/dout/out/dq (total_q, Hq, D|Dv), k/v/dk/dv (total_k, Hkv, D|Dv), lse (Hq, total_q) float32; causal
        masks are bottom-right aligned per sequence (the varlen kernels' only alignment).

Window: key j is visible to query i iff ``i + off - window_left <= j <= i + off + window_right`` (-1: unbounded;
causal is window_right = 0), off = Lk - Lq when bottom-right aligned. ``backend`` is a public function's
``backend=`` ("auto", "cpu", "cuda", "triton", "reference"), resolved by fusedattn/dispatch.py for the attention /
varlen family; each backend's backward kernel is the one its forward's autograd uses (``attention_bwd`` for
CPU and CUDA, ``triton_attention_bwd`` for Triton; the reference evaluates the formula above on materialized float32
scores, with reference.py's masks -- not its autograd, which records nothing inside an op's impl). Both ops
are first-order only and have no autograd of their own (they are a backward). Arguments are checked in the impl
and in the fake impl (shapes only, no tensor values), with ValueErrors that name the argument.
"""

from __future__ import annotations

import torch

from . import checks, dispatch
from .reference import make_window_mask

__all__ = ["LAYOUTS", "attention_backward", "varlen_attention_backward"]

LAYOUTS = ("blhd", "bhld")


# ------------------------------------------------------------------------------------------------
# argument checks (shapes only: run by the impl and the fake impl alike)
# ------------------------------------------------------------------------------------------------
def _check_same(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} must have {like_name}'s shape {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {t.device}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")


def _check_grads_and_state(dout, out, lse, lse_shape, dq, dk, dv, q, k, v) -> None:
    _check_same("dout", dout, "out", out)
    if dout.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"dout and out must have q's dtype {q.dtype}, got {dout.dtype} and {out.dtype}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(lse_shape) or lse.device != q.device:
        raise ValueError(
            f"lse must be a float32 tensor of shape {tuple(lse_shape)} on {q.device}, got {lse.dtype} "
            f"{tuple(lse.shape)} on {lse.device}"
        )
    for name, g, t, tname in (("dq", dq, q, "q"), ("dk", dk, k, "k"), ("dv", dv, v, "v")):
        _check_same(name, g, tname, t)


def _concrete(scale, window_left, window_right, softcap):
    """(scale, window, softcap) to check: while torch.compile traces with dynamic=True the scalars may be symbolic
    (SymInt / SymFloat), which the value checks cannot read; they are checked when the op runs."""
    window = (window_left, window_right)
    if not all(isinstance(w, int) for w in window):
        window = (-1, -1)
    return (scale if isinstance(scale, float) else None), window, (softcap if isinstance(softcap, float) else 0.0)


def _to_bhld(layout: str, *tensors):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return tuple(t.transpose(1, 2) for t in tensors) if layout == "blhd" else tensors


def _check_dense(dout, q, k, v, out, lse, dq, dk, dv, scale, window_left, window_right, softcap, layout):
    for name, t in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D ({'B, L, H, D' if layout == 'blhd' else 'B, H, L, D'}), got {t.dim()}-D"
            )
    qh, kh, vh, outh = _to_bhld(layout, q, k, v, out)
    checks.check_attention(qh, kh, vh, None, *_concrete(scale, window_left, window_right, softcap))
    if outh.shape[:3] != qh.shape[:3] or outh.shape[3] != vh.shape[3]:
        raise ValueError(f"out must hold q's rows and v's head dim, got shape {tuple(out.shape)}")
    _check_grads_and_state(dout, out, lse, qh.shape[:3], dq, dk, dv, q, k, v)


def _check_varlen(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap):
    scale, window, softcap = _concrete(scale, wl, wr, softcap)
    checks.check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap)
    if out.dim() != 3 or out.shape[:2] != q.shape[:2] or out.shape[2] != v.shape[2]:
        raise ValueError(f"out must be (total_q, Hq, Dv) = {(*q.shape[:2], v.shape[2])}, got {tuple(out.shape)}")
    _check_grads_and_state(dout, out, lse, (q.shape[1], q.shape[0]), dq, dk, dv, q, k, v)


# ------------------------------------------------------------------------------------------------
# the reference backward: the formula above, with materialized scores (fusedattn/reference.py's semantics)
# ------------------------------------------------------------------------------------------------
def _dense_reference(dout, q, k, v, out, lse, attn_mask, scale, window_left, window_right, bottom_right, softcap, g):
    """(B, H, L, D) tensors; float32 arithmetic, like the reference forward. Written out rather than through the
    reference's autograd: an op's impl runs below the autograd dispatch key, where no graph is recorded.
    attn_mask: None, bool (True = attend) or additive float, broadcast to (B, Hq, Lq, Lk), as the forward's;
    g: the lse's gradient (B, Hq, Lq) or None, as the fused backward ops take it."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    f32 = torch.float32
    qc, dout_c = q.to(f32), dout.to(f32)
    kc = k.to(f32).repeat_interleave(group, dim=1)  # (B, Hq, Lk, D)
    vc = v.to(f32).repeat_interleave(group, dim=1)  # (B, Hq, Lk, Dv)
    scores = (qc @ kc.transpose(-2, -1)) * scale  # (B, Hq, Lq, Lk)
    tanh = None
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    visible = make_window_mask(
        Lq, Lk, False, "bottom_right" if bottom_right else "top_left", (window_left, window_right), device=q.device
    )
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(f32)
    lse_c = lse.to(f32).unsqueeze(-1)  # (B, Hq, Lq, 1)
    # P = exp(S - lse) on visible keys of rows that see any (lse -inf: the row has no probability mass)
    keep = visible & (lse_c > float("-inf"))
    probs = torch.where(keep, torch.exp(scores - torch.where(keep, lse_c, 0.0)), 0.0)
    d_rows = (dout_c * out.to(f32)).sum(-1, keepdim=True)  # D: (B, Hq, Lq, 1)
    if g is not None:
        d_rows = d_rows - g.to(f32).unsqueeze(-1)  # d lse / d S = P
    dv = probs.transpose(-2, -1) @ dout_c  # (B, Hq, Lk, Dv)
    ds = probs * (dout_c @ vc.transpose(-2, -1) - d_rows)  # (B, Hq, Lq, Lk)
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)  # d(softcap tanh(x / softcap)) / dx
    dq = (ds @ kc) * scale
    dk = (ds.transpose(-2, -1) @ qc) * scale  # (B, Hq, Lk, D)
    fold = (B, Hkv, group, Lk)  # GQA: a kv head's gradient sums its query heads'
    return dq, dk.reshape(*fold, -1).sum(2), dv.reshape(*fold, -1).sum(2)


def _varlen_reference(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, wl, wr, bottom_right, softcap, _g):
    """Packed tensors: the dense reference per sequence (rows cu[b] .. cu[b+1]-1, bottom-right aligned)."""
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    for b in range(cu_q.shape[0] - 1):
        sq, eq, sk, ek = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if eq == sq or ek == sk:
            continue

        def one(t, s, e):  # (total, H, D) rows s..e -> (1, H, e - s, D)
            return t[s:e].transpose(0, 1).unsqueeze(0)

        g = _dense_reference(
            one(dout, sq, eq),
            one(q, sq, eq),
            one(k, sk, ek),
            one(v, sk, ek),
            one(out, sq, eq),
            lse[:, sq:eq].unsqueeze(0),
            None,
            scale,
            wl,
            wr,
            True,
            softcap,
            None if _g is None else _g[:, sq:eq].unsqueeze(0),
        )
        for dst, x, s, e in ((dq, g[0], sq, eq), (dk, g[1], sk, ek), (dv, g[2], sk, ek)):
            dst[s:e] = x[0].transpose(0, 1)
    return dq, dk, dv


def _copy_grads(grads, dq, dk, dv, layout: str = "bhld") -> None:
    for dst, g in zip(_to_bhld(layout, dq, dk, dv), grads):
        if g is None:
            dst.zero_()
        else:
            dst.copy_(g)


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fusedattn::attention_backward", mutates_args=("dq", "dk", "dv"))
def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
    layout: str,
    backend: str,
) -> None:
    """Write the gradients of one attention block into dq, dk, dv (see the module docstring)."""
    _check_dense(dout, q, k, v, out, lse, dq, dk, dv, scale, window_left, window_right, softcap, layout)
    case = dispatch.Case(q.device, q.dtype, q.shape[-1], v.shape[-1], softcap=softcap)
    entry = dispatch.resolve("attention", backend, case)
    douth, qh, kh, vh, outh = _to_bhld(layout, dout, q, k, v, out)
    with torch.no_grad():
        grads = dispatch.backward_op("attention", entry.backend)(
            douth,
            qh,
            kh,
            vh,
            outh,
            lse.contiguous(),
            None,
            scale,
            window_left,
            window_right,
            bottom_right,
            softcap,
            None,
        )
    _copy_grads(grads, dq, dk, dv, layout)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, dq, dk, dv, scale, window_left, window_right, bottom_right, softcap, layout, backend):
    _check_dense(dout, q, k, v, out, lse, dq, dk, dv, scale, window_left, window_right, softcap, layout)
    if backend not in dispatch.CHOICES:
        raise ValueError(f"backend must be one of {dispatch.CHOICES}, got {backend!r}")


@torch.library.custom_op("fusedattn::varlen_attention_backward", mutates_args=("dq", "dk", "dv"))
def varlen_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> None:
    """Write the gradients of one packed (varlen) attention block into dq, dk, dv (see the module docstring)."""
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap)
    _check_varlen(dout, q, k, v, out, lse, dq, dk, dv, *args)
    checks.check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", max_seqlen_q, "max_seqlen_q")
    checks.check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", max_seqlen_k, "max_seqlen_k")
    case = dispatch.Case(q.device, q.dtype, q.shape[-1], v.shape[-1], softcap=softcap)
    entry = dispatch.resolve("varlen", backend, case)
    with torch.no_grad():
        grads = dispatch.backward_op("varlen", entry.backend)(
            dout,
            q,
            k,
            v,
            out,
            lse.contiguous(),
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            scale,
            window_left,
            window_right,
            True,
            softcap,
            None,
        )
    _copy_grads(grads, dq, dk, dv)


@varlen_attention_backward.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    window_left,
    window_right,
    softcap,
    backend,
):
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap)
    _check_varlen(dout, q, k, v, out, lse, dq, dk, dv, *args)
    if backend not in dispatch.CHOICES:
        raise ValueError(f"backend must be one of {dispatch.CHOICES}, got {backend!r}")
