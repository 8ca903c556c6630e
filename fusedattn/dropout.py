"""Attention dropout's random stream: Philox4x32-10, counter-based, the same bits on every backend.

Element (b, h, i, j) of the (B, Hq, Lq, Lk) probability matrix (for varlen: b the sequence, i, j positions in it)
is kept or dropped by one 32-bit word of Philox4x32-10 (Salmon et al. 2011; the rounds and constants of Triton's
``tl.random.philox``) with

    key     = (seed & 0xffffffff, seed >> 32)            the 64-bit seed of the call
    counter = (j // 4, i, b * Hq + h, 0)                 word j % 4 of the four outputs

so every (b, h, i) row of up to 2^34 keys, 2^32 queries and 2^32 batch-heads has its own numbers (no element
count limit at 2^32). Element kept  <=>  (word >> 1) >= floor(p * 2^31), a 31-bit integer comparison that every
backend makes exactly; kept probabilities are scaled by 1/(1-p). The forward's lse is that of the undropped
scores (dropout applies to P before P.V); the backward regenerates the mask from the seed (nothing O(L^2) is
stored).

The seed is drawn per call from torch's default generator of the input's device (``draw_seed``), so
``torch.manual_seed`` makes runs reproducible, and handed to the ops as a (1,) int64 tensor (so torch.compile
traces the draw instead of breaking the graph on a Python int).

``dropout_mask`` is the pure-torch implementation (int64 arithmetic masked to 32 bits) the reference and the tests
use; ``attention(..., return_dropout_mask=True)`` returns the mask a call used.
"""

from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF


def keep_threshold(p: float) -> int:
    """The 31-bit threshold: an element is kept iff (word >> 1) >= keep_threshold(p) (C++ and Triton: the same
    double product truncated)."""
    return int(float(p) * 2147483648.0)


def draw_seed(device) -> torch.Tensor:
    """A (1,) int64 seed from torch's default generator of ``device`` (reproducible under torch.manual_seed)."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)


def _mul32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a 32-bit constant a and b in [0, 2^32), in int64 without overflow."""
    bl, bh = b & 0xFFFF, b >> 16
    t = a * bl  # < 2^48
    u = a * bh + (t >> 16)  # < 2^49
    hi = u >> 16
    lo = ((u << 16) + (t & 0xFFFF)) & _M32
    return hi, lo


def philox4x32(seed: int, c0, c1, c2, c3):
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors holding 32-bit values, broadcastable) under a 64-bit
    seed; returns the four output words as int64 tensors in [0, 2^32). Bit for bit Triton's tl.random.philox."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _M32, (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _seed_int(seed) -> int:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"dropout_seed must be a (1,) int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        seed = int(seed.reshape(()).item())
    return int(seed) & 0xFFFFFFFFFFFFFFFF


def dropout_keep(seed, B: int, Hq: int, Lq: int, Lk: int, p: float, batch_offset: int = 0, device="cpu"):
    """The keep mask (B, Hq, Lq, Lk) bool of dropout rate ``p`` under ``seed`` (int or (1,) int64 tensor); row
    batch index b is counted from ``batch_offset`` (varlen: the sequence index)."""
    s = _seed_int(seed)
    n4 = (Lk + 3) // 4
    i64 = dict(dtype=torch.int64, device=device)
    bh = (torch.arange(B, **i64)[:, None] + batch_offset) * Hq + torch.arange(Hq, **i64)[None, :]  # (B, Hq)
    c0 = torch.arange(n4, **i64).view(1, 1, 1, n4)
    c1 = torch.arange(Lq, **i64).view(1, 1, Lq, 1)
    c2 = (bh & _M32).view(B, Hq, 1, 1)
    words = torch.stack(philox4x32(s, c0, c1, c2, torch.zeros((), **i64)), dim=-1)  # (B, Hq, Lq, n4, 4)
    words = words.reshape(B, Hq, Lq, 4 * n4)[..., :Lk]
    return (words >> 1) >= keep_threshold(p)


def dropout_mask(seed, B: int, Hq: int, Lq: int, Lk: int, p: float, device="cpu") -> torch.Tensor:
    """The dropout multiplier (B, Hq, Lq, Lk) float64 of a dense call: 1/(1-p) where kept, 0 where dropped."""
    keep = dropout_keep(seed, B, Hq, Lq, Lk, p, device=device)
    return keep.to(torch.float64) / (1.0 - p)


def varlen_dropout_mask(seed, cu_seqlens_q, cu_seqlens_k, Hq: int, p: float) -> list:
    """Per sequence b of a varlen call, its multiplier (1, Hq, Lq_b, Lk_b) float64 (sequence b is batch index b)."""
    cq, ck = [int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()]
    out = []
    for b in range(len(cq) - 1):
        keep = dropout_keep(seed, 1, Hq, cq[b + 1] - cq[b], ck[b + 1] - ck[b], p, batch_offset=b)
        out.append(keep.to(torch.float64) / (1.0 - p))
    return out
