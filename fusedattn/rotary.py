"""Rotary position embedding applied at cache positions: what ``decode_attention(rotary_cos=, rotary_sin=)`` and
``flash_attn_with_kvcache`` do to q and k_new before the append.

Tables: ``cos``, ``sin`` (seqlen_ro, rotary_dim / 2); the first ``rotary_dim`` dims of each head rotate, the rest
pass through. Pairs: GPT-NeoX / Llama style (``interleaved=False``: dims i and i + rotary_dim/2) or GPT-J style
(``interleaved=True``: dims 2i and 2i+1). Computed in float32 and rounded once to the input dtype (as
flash-attn's kernels do). Decode appends are a few rows per sequence, so this is a handful of small elementwise
ops beside the attention over the whole cache.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rotary"]


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """x (B, L, H, D) rotated at ``positions`` (B, L) (integer, each < seqlen_ro); returns a new tensor in x's
    dtype (x is not modified)."""
    half = cos.shape[-1]
    rd = 2 * half
    c = cos[positions].to(torch.float32).unsqueeze(2)  # (B, L, 1, rd/2)
    s = sin[positions].to(torch.float32).unsqueeze(2)
    xr = x[..., :rd].to(torch.float32)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]  # (B, L, H, rd/2)
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)
