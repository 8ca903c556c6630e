"""Public attention functions: the torch drop-in and the flash-style API.

Both validate their arguments here, once, with errors that name the argument, then call a
backend chosen in fusedattn/dispatch.py. The fused kernels are torch ops
(``torch.ops.fusedattn.attention_fwd``, with autograd and a fake impl), so everything here works
under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import dispatch
from .reference import attention_ref

# The real torch function, captured so that the drop-in keeps working after a user does
# ``F.scaled_dot_product_attention = fusedattn.scaled_dot_product_attention``.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: Optional[int] = None, layout: str = "(B, H, L, D)") -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def _validate_scalars(scale, window, softcap) -> Tuple[int, int]:
    """Checks scale, softcap and window (shared by every flash-style entry point); returns (left, right)."""
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and -1 <= w < 2**63 for w in window)):
        raise ValueError(f"window must be a pair of ints (left, right), each in [0, 2**63) or -1 for unbounded, "
                         f"got {window!r}")
    return int(window[0]), int(window[1])


def _validate(q, k, v, attn_mask, scale, window, softcap) -> Tuple[int, int]:
    """Checks the flash-style arguments; returns the normalized window (left, right)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=4)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device: q {q.device}, k {k.device}, v {v.device}")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k head dim {k.shape[3]} != q head dim {D} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's heads and length: k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of key/value "
                         f"heads in k and v ({Hkv})")
    if attn_mask is not None:
        _check_mask(attn_mask, q, (B, Hq, Lq, k.shape[2]))
    return _validate_scalars(scale, window, softcap)


def _check_mask(attn_mask, q, full_shape) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool or floating-point, got dtype {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on {q.device}, got {attn_mask.device}")
    shape = tuple(attn_mask.shape)
    if len(shape) > len(full_shape) or any(
            m != 1 and m != f for m, f in zip(shape[::-1], full_shape[::-1])):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to {tuple(full_shape)}")


def _default_scale(scale, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


# ------------------------------------------------------------------------------------------------
# flash-style API
# ------------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
              window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, return_lse: bool = False,
              backend: str = "auto"):
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
    left, right = _validate(q, k, v, attn_mask, scale, window, softcap)
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("attn_mask must not require grad: the fused kernels give no mask gradient "
                         "(detach it, or use torch's scaled_dot_product_attention)")
    scale = _default_scale(scale, q.shape[-1])
    name = dispatch.select_backend(backend, q.device, q.dtype)
    if name == "cuda":
        reason = dispatch.cuda_unsupported_reason(q.dtype, q.shape[-1], v.shape[-1], attn_mask is not None, softcap)
        if reason is not None:
            if backend == "cuda":
                raise RuntimeError(f"fusedattn backend 'cuda' does not cover this case: {reason}")
            if dispatch._unavailable_reason("triton") is None:  # "auto": the Triton kernels cover every case
                name = "triton"
            else:
                dispatch.warn_fallback(f"cuda: {reason}", target="the reference implementation")
                name = "reference"
    if name == "reference":
        out, lse = attention_ref(q, k, v, attn_mask=attn_mask, causal=causal, causal_align="bottom_right",
                                 scale=scale, window=(left, right), softcap=softcap, return_lse=True)
        return (out, lse) if return_lse else out
    if causal:
        right = 0
    # "cpu" and "cuda" share one op (torch dispatches on the device); the Triton kernels are their own op.
    op = torch.ops.fusedattn.triton_attention_fwd if name == "triton" else torch.ops.fusedattn.attention_fwd
    out, lse = op(q, k, v, attn_mask, scale, left, right, True, float(softcap))
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# torch drop-in
# ------------------------------------------------------------------------------------------------
def _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, enable_gqa) -> Optional[str]:
    if dropout_p > 0.0:
        return f"dropout_p={dropout_p} (the fused kernels have no dropout)"
    if query.dtype not in dispatch.FUSED_DTYPES:
        return f"dtype {query.dtype} (fused kernels take {', '.join(str(d) for d in dispatch.FUSED_DTYPES)})"
    if query.dim() not in (3, 4):
        return f"{query.dim()}-D inputs (fused kernels take 3-D or 4-D)"
    if attn_mask is not None and attn_mask.requires_grad:
        return "attn_mask requires grad (the fused kernels give no mask gradient)"
    if query.device.type != "cpu":
        if query.device.type != "cuda":
            return f"no fused kernel for {query.device} tensors"
        if _sdpa_cuda_backend() is None:
            return (f"no fused kernel for {query.device} tensors (triton: {dispatch._unavailable_reason('triton')}; "
                    f"cuda: {dispatch._unavailable_reason('cuda')})")
        return None
    return dispatch._unavailable_reason("cpu")


def _sdpa_cuda_backend() -> Optional[str]:
    """The drop-in's kernel for CUDA tensors: the Triton kernels, else the CUDA C++ ones, else None."""
    for name in ("triton", "cuda"):
        if dispatch._unavailable_reason(name) is None:
            return name
    return None


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in replacement for ``torch.nn.functional.scaled_dot_product_attention``.

    Same signature and semantics (``is_causal`` is top-left aligned, as in torch). Runs the fused
    kernel where one covers the call; otherwise (dropout, float64, a mask that needs a gradient,
    no kernel for the device) it calls torch's own function and says so with a UserWarning.
    Invalid arguments are left to torch, so they raise torch's own errors. Rows whose mask hides
    every key give 0 (torch may give NaN there).
    """
    tensors_ok = all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (query, key, value))
    same = tensors_ok and key.dtype == query.dtype == value.dtype and key.device == query.device == value.device
    shapes_ok = same and key.dim() == query.dim() == value.dim() and query.shape[:-3] == key.shape[:-3] == \
        value.shape[:-3] and key.shape[-2] == value.shape[-2] and key.shape[-1] == query.shape[-1]
    heads_ok = shapes_ok and query.dim() >= 3 and (
        query.shape[-3] == key.shape[-3] == value.shape[-3] or (
            enable_gqa and query.dim() == 4 and key.shape[-3] == value.shape[-3] and key.shape[-3] > 0
            and query.shape[-3] % key.shape[-3] == 0))
    mask_ok = attn_mask is None or (isinstance(attn_mask, torch.Tensor) and attn_mask.device == query.device and (
        attn_mask.dtype == torch.bool or attn_mask.dtype == query.dtype) and attn_mask.dim() <= query.dim())
    scale_ok = scale is None or (isinstance(scale, (int, float)) and math.isfinite(scale))
    if not (heads_ok and mask_ok and scale_ok) or (is_causal and attn_mask is not None):
        # Not something our kernel should interpret: torch either runs it or raises its own error.
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    reason = _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, enable_gqa)
    if reason is not None:
        dispatch.warn_fallback(reason, target="torch.nn.functional.scaled_dot_product_attention")
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    squeeze = query.dim() == 3  # (N, L, E): one head
    q, k, v = (t.unsqueeze(1) for t in (query, key, value)) if squeeze else (query, key, value)
    mask = attn_mask
    if mask is not None:
        if squeeze and mask.dim() == 3:
            mask = mask.unsqueeze(1)
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                               is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    use_triton = query.device.type == "cuda" and _sdpa_cuda_backend() == "triton"
    op = torch.ops.fusedattn.triton_attention_fwd if use_triton else torch.ops.fusedattn.attention_fwd
    out, _ = op(q, k, v, mask, _default_scale(scale, q.shape[-1]), -1, 0 if is_causal else -1, False, 0.0)
    return out.squeeze(1) if squeeze else out
