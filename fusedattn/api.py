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
        return_lse: also return the log-sum-exp of each row's scores, (B, Hq, Lq) float32.
        backend: "auto", "cpu", "triton", "cuda" or "reference" (see fusedattn.dispatch).

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, and lse if ``return_lse``. A row that sees no key
        gives output 0 and lse -inf (never NaN). Differentiable in q, k, v (and through lse).
    """
    left, right = checks.check_attention(q, k, v, attn_mask, scale, window, softcap)
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError(
            "attn_mask must not require grad: the fused kernels give no mask gradient "
            "(detach it, or use torch's scaled_dot_product_attention)"
        )
    case = dispatch.Case(q.device, q.dtype, q.shape[-1], v.shape[-1], has_mask=attn_mask is not None, softcap=softcap)
    op = dispatch.resolve("attention", backend, case).op
    out, lse = op(
        q, k, v, attn_mask, checks.default_scale(scale, q.shape[-1]), left, 0 if causal else right, True, float(softcap)
    )
    return (out, lse) if return_lse else out


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
    op = dispatch.resolve("sdpa", "auto", case).op
    return op(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
