"""Public attention functions: the torch drop-in and the flash-style API.

Both validate their arguments here, once (fusedattn/checks.py), with errors that name the argument, then call the
op of the backend that fusedattn/dispatch.py resolves for the call. The fused kernels are torch ops
(``torch.ops.fusedattn.attention_fwd``, with autograd and a fake impl), so everything here works under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import checks, dispatch
from .sinks import apply_sinks

# torch's own function (captured by dispatch before anyone can monkeypatch F.scaled_dot_product_attention): the
# drop-in hands it every call that is not ours to interpret.
_torch_sdpa = dispatch.TORCH_SDPA


# ------------------------------------------------------------------------------------------------
# flash-style API
# ------------------------------------------------------------------------------------------------
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    attn_mask: Optional[torch.Tensor] = None,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Fused softmax attention, FlashAttention-style.

    Args:
        q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv). ``Hq % Hkv == 0`` (GQA/MQA:
            query head h reads kv head ``h // (Hq // Hkv)``; K/V are never expanded). Any strides.
        causal: bottom-right aligned when Lq != Lk: query i sees keys ``j <= i + Lk - Lq``.
        scale: multiplies q.k; default ``1/sqrt(D)``.
        attn_mask: bool (True = keep) or additive float, broadcastable to (B, Hq, Lq, Lk).
        window: (left, right) sliding window around the same diagonal, -1 = unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` (before the mask).
        sinks: (Hq,) float, optional: attention sinks (gpt-oss), one learned logit per query head that joins
            every row's softmax denominator (not scaled, capped or masked; no value). Differentiable.
        return_lse: also return the log-sum-exp of each row's scores, (B, Hq, Lq) float32 (with sinks: of the
            scores and the sink).
        backend: "auto", "cpu", "triton", "cuda" or "reference" (see fusedattn.dispatch).

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, and lse if ``return_lse``. A row that sees no key
        gives output 0 and lse -inf (never NaN). Differentiable in q, k, v (and through lse).
    """
    left, right = checks.check_attention(q, k, v, attn_mask, scale, window, softcap)
    checks.check_sinks(sinks, q, q.shape[1])
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError(
            "attn_mask must not require grad: the fused kernels give no mask gradient "
            "(detach it, or use torch's scaled_dot_product_attention)"
        )
    case = dispatch.Case(q.device, q.dtype, q.shape[-1], v.shape[-1], has_mask=attn_mask is not None, softcap=softcap)
    op = dispatch.resolve("attention", backend, case).op
    q, scale = _traceable_default_scale(q, scale)
    out, lse = op(
        q, k, v, attn_mask, checks.default_scale(scale, q.shape[-1]), left, 0 if causal else right, True, float(softcap)
    )
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks, "bhld")
    return (out, lse) if return_lse else out


def _traceable_default_scale(q: torch.Tensor, scale: Optional[float]) -> Tuple[torch.Tensor, Optional[float]]:
    """(q, scale) to hand the op: as given, except under torch.jit.trace with the default scale.

    The ops take the scale as a float, which torch.jit.trace records as a constant: a trace made at head dim 8
    would keep 1/sqrt(8) when run at 32. torch's own SDPA computes its default inside the op from
    ``query.size(-1)``, which the trace records. Here the trace records it too: the op keeps the trace-time scale
    and q is multiplied by ``(1/sqrt(q.size(-1))) / that scale``, computed from the traced size (so the trace
    records the arithmetic). The factor is exactly 1 at the traced head dim (the output is bit for bit the
    untraced one); at another head dim q is scaled in float32 and rounded once to its dtype, as torch's math
    SDPA scales q. Outside a trace nothing changes.
    """
    if scale is not None or not torch.jit.is_tracing():
        return q, scale
    d = q.size(-1)  # a 0-D tensor while tracing: what is computed from it is recorded
    d = (d if isinstance(d, torch.Tensor) else torch.tensor(d)).to(torch.float64)
    wanted = torch.where(d > 0, d.rsqrt(), torch.ones_like(d))  # checks.default_scale: 1 for an empty head dim
    traced = checks.default_scale(None, q.shape[-1])  # the trace-time scale: a constant in the trace
    factor = (wanted / traced).to(torch.float32)  # 1 +- 1 float64 ulp at the traced head dim: 1.0 in float32
    return (q.to(torch.float32) * factor).to(q.dtype), traced


# ------------------------------------------------------------------------------------------------
# torch drop-in
# ------------------------------------------------------------------------------------------------
def _ours_to_interpret(query, key, value, attn_mask, is_causal, scale, enable_gqa) -> bool:
    """Whether the call is one the fused kernels could mean the same thing for (valid shapes, dtypes, devices, a
    mask that broadcasts, a finite scale); anything else goes to torch as is, to run or raise its own error."""
    tensors_ok = all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (query, key, value))
    same = tensors_ok and key.dtype == query.dtype == value.dtype and key.device == query.device == value.device
    shapes_ok = (
        same
        and key.dim() == query.dim() == value.dim()
        and query.shape[:-3] == key.shape[:-3] == value.shape[:-3]
        and key.shape[-2] == value.shape[-2]
        and key.shape[-1] == query.shape[-1]
    )
    heads_ok = (
        shapes_ok
        and query.dim() >= 3
        and (
            query.shape[-3] == key.shape[-3] == value.shape[-3]
            or (
                enable_gqa
                and query.dim() == 4
                and key.shape[-3] == value.shape[-3]
                and key.shape[-3] > 0
                and query.shape[-3] % key.shape[-3] == 0
            )
        )
    )
    mask_ok = attn_mask is None or (
        isinstance(attn_mask, torch.Tensor)
        and attn_mask.device == query.device
        and (attn_mask.dtype == torch.bool or attn_mask.dtype == query.dtype)
        and attn_mask.dim() <= query.dim()
    )
    scale_ok = scale is None or (isinstance(scale, (int, float)) and -math.inf < scale < math.inf)
    if not (heads_ok and mask_ok and scale_ok) or (is_causal and attn_mask is not None):
        return False
    if attn_mask is not None and query.dim() in (3, 4):
        Lq, Lk = query.shape[-2], key.shape[-2]
        full = (query.shape[0], 1, Lq, Lk) if query.dim() == 3 else (query.shape[0], query.shape[1], Lq, Lk)
        mask_shape = (
            (attn_mask.shape[0], 1, *attn_mask.shape[1:])
            if query.dim() == 3 and attn_mask.dim() == 3
            else tuple(attn_mask.shape)
        )
        try:
            torch.broadcast_shapes(mask_shape, full)
        except RuntimeError:
            return False
    return True


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in replacement for ``torch.nn.functional.scaled_dot_product_attention``.

    Same signature and semantics (``is_causal`` is top-left aligned, as in torch). Runs the fused
    kernel where one covers the call; otherwise (dropout, float64, a mask that needs a gradient,
    no kernel for the device or the case) it calls torch's own function and says so with a UserWarning.
    Invalid arguments are left to torch, so they raise torch's own errors. Rows whose mask hides
    every key give 0 (torch may give NaN there).
    """
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    if not _ours_to_interpret(query, key, value, attn_mask, is_causal, scale, enable_gqa):
        return _torch_sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    case = dispatch.Case(
        query.device,
        query.dtype,
        query.shape[-1],
        value.shape[-1],
        has_mask=attn_mask is not None,
        dropout_p=dropout_p,
        ndim=query.dim(),
        mask_requires_grad=attn_mask is not None and attn_mask.requires_grad,
    )
    _check_mask_rank(query, key, attn_mask, dropout_p)
    op = dispatch.resolve("sdpa", "auto", case).op
    query, scale = _traceable_default_scale(query, scale)
    return op(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _autocast(*tensors):
    """The arguments as torch's SDPA sees them under autocast.

    ``scaled_dot_product_attention`` is in autocast's ``lower_precision_fp`` list on CPU and on CUDA
    (ATen's autocast_mode.cpp): every floating-point tensor argument on the autocast device, float64 aside, is
    cast to the autocast dtype before the op runs (so fp32 q, k, v and a float mask under
    ``torch.autocast("cpu", torch.bfloat16)`` run, and return, in bf16). The fused ops are not in any autocast
    list (the autocast key falls through for them), so the drop-in applies the same policy itself. Plain
    ``torch.is_autocast_enabled(device)`` / ``.to`` calls: traced by torch.compile as torch's own autocast is.
    """
    cast = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            dev = t.device.type
            if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
                t = t.to(torch.get_autocast_dtype(dev))
        cast.append(t)
    return cast


def _check_mask_rank(query, key, attn_mask, dropout_p) -> None:
    """torch's SDPA rejects an attn_mask of fewer than 2 dims with 4-D inputs (IndexError: its CPU kernel choice
    reads the mask's size(-2)), where it would pick its fused kernel: no dropout, a mask that needs no gradient,
    no empty input. The drop-in raises there too (the same type, naming attn_mask); 3-D and 5-D inputs take such
    masks in torch, and here (they broadcast)."""
    if (
        attn_mask is not None
        and attn_mask.dim() < 2
        and query.dim() == 4
        and dropout_p == 0.0
        and not attn_mask.requires_grad
        and query.numel() > 0
        and key.numel() > 0
    ):
        raise IndexError(
            f"attn_mask must have at least 2 dims (..., L, S) for 4-D query/key/value, got shape "
            f"{tuple(attn_mask.shape)} (torch.nn.functional.scaled_dot_product_attention rejects it too)"
        )
