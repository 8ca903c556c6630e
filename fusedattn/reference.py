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

__all__ = ["attention_ref", "make_window_mask"]

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

    Returns:
        out (B, Hq, Lq, Dv) in q.dtype, and with ``return_lse`` the lse (B, Hq, Lq) in float32
        (float64 when ``compute_dtype`` is float64). Rows with no visible key give out = 0, lse = -inf.
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

    # Softmax with a finite shift. The max is detached: softmax and lse are shift invariant, so gradients are
    # unchanged, and a fully masked row (max = -inf) shifts by 0 so that exp gives 0 instead of NaN. NaN
    # scores make the max NaN, which propagates to the row's output on purpose.
    if Lk > 0:
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
