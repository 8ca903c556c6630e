"""Triton flash attention: forward, backward (dK/dV pass + dQ pass), dense and varlen, and their torch ops.

Layout of this file: the kernels (``_attn_fwd``, ``_attn_bwd_preprocess``, and ``_attn_bwd``, whose
``DKDV_PASS`` constexpr picks the dK/dV pass or the dQ pass after one shared prologue), their autotune configs,
the launchers, then the torch ops and the two differentiable entry points ``attention`` and ``varlen_attention``. The op registration lives here rather than in fusedattn/_ops.py
because on a GPU the op *is* the launcher: ``torch.library.triton_op`` wraps the Python function that launches
the kernels (through ``wrap_triton``), so torch.compile sees the kernels themselves. Under the interpreter
(``TRITON_INTERPRET=1``) the same launchers are registered with ``torch.library.custom_op`` plus fake impls,
because triton_op does not survive torch.compile there (both through ``_common.register_op``). Their fake impls
and autograd are the C++ ops' (``fusedattn._ops.register_attention_pair``). Registered ops
(namespace ``fusedattn``):

    triton_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int window_left,
                         int window_right, bool bottom_right, float softcap) -> (Tensor out, Tensor lse)
    triton_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                         Tensor? attn_mask, float scale, int window_left, int window_right, bool bottom_right,
                         float softcap, Tensor? grad_lse) -> (Tensor dq, Tensor dk, Tensor dv)
    triton_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,
                      int max_seqlen_k, float scale, int window_left, int window_right, float softcap)
                      -> (Tensor out, Tensor lse)
    triton_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                      Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale,
                      int window_left, int window_right, float softcap, Tensor? grad_lse)
                      -> (Tensor dq, Tensor dk, Tensor dv)

The dense ops have exactly the semantics of ``fusedattn::attention_fwd`` / ``attention_bwd`` (see
csrc/torch_bindings.cpp and fusedattn/reference.py): query i sees key j iff
``i + off - window_left <= j <= i + off + window_right`` with ``off = Lk - Lq`` when ``bottom_right`` (else 0) and
-1 meaning unbounded; ``softcap > 0`` caps the scaled scores with ``softcap * tanh(s / softcap)`` before the
additive mask; a row that sees no key gives out 0 and lse -inf. The varlen ops apply the same rule per sequence,
always bottom-right aligned (``flash_attn_varlen_func``'s convention).

Precision: scores (natural units, see _common.LOG2E), softmax statistics and accumulators are float32. fp16/bf16
inputs go through tensor-core ``tl.dot`` on the input dtype (P and dS are rounded to it before their matmuls, as in
FlashAttention; all matmuls go through ``_common.mma``). float32 inputs use ``tl.dot(..., input_precision="ieee")``:
exact fp32 products, **no tf32**, so fp32 results are as accurate as a float32 PyTorch computation (and about 8x
slower than bf16 on tensor-core GPUs).

Determinism: no atomics. dK/dV are accumulated by the program that owns a key block (looping over every query
head of its GQA group), dQ by the program that owns a query block, so gradients are bit-identical run to run.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fusedattn._ops import register_attention_pair

from ._common import INTERPRET, exp_via_exp2, launch, log_via_log2, mma, pow2, register_op, softcap_scores

__all__ = ["INTERPRET", "attention", "varlen_attention"]


# ================================================================================================================
# kernels
# ================================================================================================================
# Every kernel starts the same way (_program): the sequence's rows in the packed tensors, its lengths and the
# diagonal offset; every (batch, head) slice is addressed once per program, before any tile is loaded. Inputs
# (q, k, v, do, out) take (batch, head, row) strides; the launchers give them a unit head-dim stride. Tensors this
# file allocates or makes contiguous (out, lse, delta, grad_lse, dq, dk, dv) take no strides: _rows_bh and
# _lse_bh address them from their shapes.


@triton.jit
def _program(CuQ, CuK, off_b, Lq, Lk, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(first row of the sequence in the packed tensor, its length) for queries and keys, and diag, the offset of
    the diagonal (key j = query i + diag is aligned with query i). Dense tensors start at row 0 of their batch
    entry (the batch stride does the rest); varlen ones at cu_seqlens[b] (batch stride 0)."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + off_b)
        seq_q = tl.load(CuQ + off_b + 1) - q_start
        k_start = tl.load(CuK + off_b)
        seq_k = tl.load(CuK + off_b + 1) - k_start
    else:
        q_start = 0
        seq_q = Lq
        k_start = 0
        seq_k = Lk
    diag = seq_k - seq_q if BOTTOM_RIGHT else 0
    return q_start, seq_q, k_start, seq_k, diag


@triton.jit
def _bh(ptr, off_b, off_h, stride_b, stride_h):
    """The (batch, head) slice of a strided tensor, in 64-bit offsets."""
    return ptr + off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h


@triton.jit
def _rows_bh(ptr, off_b, off_h, H, L, WIDTH, IS_VARLEN: tl.constexpr):
    """(base, row stride) of the (batch, head) slice of a contiguous tensor of H heads and rows of WIDTH: dense
    (B, H, L, WIDTH), varlen (total, H, WIDTH) (rows are then packed-tensor rows)."""
    if IS_VARLEN:
        return ptr + off_h.to(tl.int64) * WIDTH, H * WIDTH
    return ptr + (off_b.to(tl.int64) * H + off_h) * L * WIDTH, WIDTH


@triton.jit
def _lse_bh(ptr, off_b, off_h, H, L, IS_VARLEN: tl.constexpr):
    """The (batch, head) row of a contiguous lse-shaped tensor: dense (B, H, L), varlen (H, total = L)."""
    if IS_VARLEN:
        return ptr + off_h.to(tl.int64) * L
    return ptr + (off_b.to(tl.int64) * H + off_h) * L


@triton.jit
def _key_range(
    start_m,
    seq_k,
    diag,
    window_left,
    window_right,
    WIN_LEFT: tl.constexpr,
    WIN_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """[lo, hi): the keys the window lets query rows [start_m * BLOCK_M, + BLOCK_M) see; lo on a block boundary."""
    lo = 0
    hi = seq_k
    if WIN_LEFT:
        lo = tl.maximum(start_m * BLOCK_M + diag - window_left, 0) // BLOCK_N * BLOCK_N
    if WIN_RIGHT:
        hi = tl.minimum(start_m * BLOCK_M + BLOCK_M + diag + window_right, seq_k)
    return lo, hi


@triton.jit
def _scores(
    qk,
    rows,
    cols,
    seq_q,
    seq_k,
    diag,
    mask_ptrs,
    scale,
    softcap,
    window_left,
    window_right,
    HAS_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WIN_LEFT: tl.constexpr,
    WIN_RIGHT: tl.constexpr,
):
    """Scores (natural units), -inf where not visible, and tanh(s / softcap) (for the softcap's derivative).

    qk: raw q.k tile, (BLOCK_M, BLOCK_N), or transposed (BLOCK_N, BLOCK_M) in the dK/dV pass; rows / cols are the
    query / key indices broadcast to the tile's shape."""
    s, t = softcap_scores(qk, scale, softcap, SOFTCAP)
    visible = (rows < seq_q) & (cols < seq_k)
    if HAS_MASK:
        s += tl.load(mask_ptrs, mask=visible, other=0.0).to(tl.float32)
    if WIN_LEFT:
        visible &= cols >= rows + diag - window_left
    if WIN_RIGHT:
        visible &= cols <= rows + diag + window_right
    s = tl.where(visible, s, float("-inf"))
    return s, t


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    CuQ,
    CuK,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    Lq,
    Lk,
    GROUP,
    D,
    DV,
    scale,
    softcap,
    window_left,
    window_right,
    HEAD_DIM_KEY: tl.constexpr,
    CAUSAL_KEY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WIN_LEFT: tl.constexpr,
    WIN_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (sequence, query head). q: (B, Hq, Lq, D) (varlen: (total_q, Hq, D)).
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, seq_q, k_start, seq_k, diag = _program(CuQ, CuK, off_b, Lq, Lk, IS_VARLEN, BOTTOM_RIGHT)
    if start_m * BLOCK_M >= seq_q:
        return
    off_hk = off_h // GROUP  # GQA: K/V are indexed, never expanded
    H = tl.num_programs(1)
    Q = _bh(Q, off_b, off_h, stride_qb, stride_qh)
    K = _bh(K, off_b, off_hk, stride_kb, stride_kh)
    V = _bh(V, off_b, off_hk, stride_vb, stride_vh)
    Mask = _bh(Mask, off_b, off_h, stride_mb, stride_mh)
    Out, stride_om = _rows_bh(Out, off_b, off_h, H, Lq, DV, IS_VARLEN)
    Lse = _lse_bh(Lse, off_b, off_h, H, Lq, IS_VARLEN)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # head dims are padded to a power of two; loads mask d >= D
    offs_dv = tl.arange(0, BLOCK_DV)
    qrows = (q_start + offs_m).to(tl.int64)
    row_ok = offs_m < seq_q
    q = tl.load(
        Q + qrows[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0
    )  # (BLOCK_M, BLOCK_D)
    kT_ptrs = K + (k_start + offs_n[None, :]).to(tl.int64) * stride_kn + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
    v_ptrs = V + (k_start + offs_n[:, None]).to(tl.int64) * stride_vn + offs_dv[None, :]  # (BLOCK_N, BLOCK_DV)
    mask_ptrs = Mask + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn
    lo, hi = _key_range(start_m, seq_k, diag, window_left, window_right, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N)

    # Online softmax: m_i is the running row max, l_i the running sum of exp(s - m_i), acc the
    # running P @ V; when the max grows, l_i and acc are rescaled by alpha = exp(m_old - m_new).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT = tl.load(kT_ptrs + start_n * stride_kn, mask=(cols[None, :] < seq_k) & (offs_d[:, None] < D), other=0.0)
        s, _ = _scores(
            mma(q, kT, None),
            offs_m[:, None],
            cols[None, :],
            seq_q,
            seq_k,
            diag,
            mask_ptrs + start_n * stride_mn,
            scale,
            softcap,
            window_left,
            window_right,
            HAS_MASK,
            SOFTCAP,
            WIN_LEFT,
            WIN_RIGHT,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only -inf so far shifts by 0, so exp2 gives 0 rather than exp2(-inf + inf) = NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = exp_via_exp2(m_i - m_use)
        p = exp_via_exp2(s - m_use[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=(cols[:, None] < seq_k) & (offs_dv[None, :] < DV), other=0.0)
        acc = mma(p, v, acc * alpha[:, None])
        m_i = m_new

    empty = l_i == 0.0  # no visible key: out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + log_via_log2(l_safe))
    tl.store(
        Out + qrows[:, None] * stride_om + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(Lse + qrows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(
    Out,
    DO,
    GLse,
    Delta,
    CuQ,
    stride_ob,
    stride_oh,
    stride_om,
    stride_gb,
    stride_gh,
    stride_gm,
    Lq,
    DV,
    IS_VARLEN: tl.constexpr,
    HAS_GLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # Delta = rowsum(dO * O) - dLse: with P = softmax, dS = P * (dP - Delta) covers both the gradient through
    # out and the one through lse (d lse / d s = P). GLse and Delta: contiguous, lse-shaped.
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, seq_q, _, _, _ = _program(CuQ, CuQ, off_b, Lq, Lq, IS_VARLEN, False)
    if start_m * BLOCK_M >= seq_q:
        return
    H = tl.num_programs(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (q_start + offs_m).to(tl.int64)
    row_ok = offs_m < seq_q
    ld_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(
        _bh(Out, off_b, off_h, stride_ob, stride_oh) + rows[:, None] * stride_om + offs_dv[None, :],
        mask=ld_mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        _bh(DO, off_b, off_h, stride_gb, stride_gh) + rows[:, None] * stride_gm + offs_dv[None, :],
        mask=ld_mask,
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_GLSE:
        delta -= tl.load(_lse_bh(GLse, off_b, off_h, H, Lq, IS_VARLEN) + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(_lse_bh(Delta, off_b, off_h, H, Lq, IS_VARLEN) + rows, delta, mask=row_ok)


@triton.jit
def _bwd_query_rows(Q, DO, Lse, Delta, rows, qrows, seq_q, offs_d, offs_dv, D, DV, stride_qm, stride_gm):
    """What both backward passes read per block of query rows (Q, DO, Lse, Delta already at their (batch, head)
    slice; Delta shares lse's layout): q (BLOCK_M, BLOCK_D), do (BLOCK_M, BLOCK_DV), lse and delta (BLOCK_M,)."""
    row_ok = rows < seq_q
    q = tl.load(
        Q + qrows[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0
    )
    do = tl.load(
        DO + qrows[:, None] * stride_gm + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0
    )
    lse = tl.load(Lse + qrows, mask=row_ok, other=0.0)
    # A row that saw no key has lse -inf; +inf makes its P exactly 0 (exp2(-inf - inf)) instead of NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + qrows, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _bwd_ds(p, dp, delta, t, SOFTCAP: tl.constexpr):
    """dS = P * (dP - Delta), times the softcap's derivative d/ds softcap*tanh(s/softcap) = 1 - t^2."""
    ds = p * (dp - delta)
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _attn_bwd(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DQ,
    DK,
    DV_,
    CuQ,
    CuK,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_gb,
    stride_gh,
    stride_gm,
    Lq,
    Lk,
    GROUP,
    D,
    DV,
    scale,
    softcap,
    window_left,
    window_right,
    HEAD_DIM_KEY: tl.constexpr,
    CAUSAL_KEY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WIN_LEFT: tl.constexpr,
    WIN_RIGHT: tl.constexpr,
    DKDV_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The two backward passes, one kernel (DKDV_PASS picks one at compile time) with one prologue:
    #   dK/dV pass: one program = BLOCK_N keys of one (sequence, kv head); it owns dK/dV of those keys and sums
    #     over every query head of the GQA group, so no atomics are needed. Tiles are kept transposed
    #     (keys x queries): S^T, P^T.
    #   dQ pass: one program = dQ of BLOCK_M query rows of one (sequence, query head); recomputes P from q, k, lse.
    start = tl.program_id(0)
    off_h = tl.program_id(1)  # kv head in the dK/dV pass, query head in the dQ pass
    off_b = tl.program_id(2)
    q_start, seq_q, k_start, seq_k, diag = _program(CuQ, CuK, off_b, Lq, Lk, IS_VARLEN, BOTTOM_RIGHT)
    Hkv = tl.num_programs(1) if DKDV_PASS else tl.num_programs(1) // GROUP
    off_hk = off_h if DKDV_PASS else off_h // GROUP
    K = _bh(K, off_b, off_hk, stride_kb, stride_kh)
    V = _bh(V, off_b, off_hk, stride_vb, stride_vh)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    if DKDV_PASS:
        if start * BLOCK_N >= seq_k:
            return
        offs_n = start * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        krows = (k_start + offs_n).to(tl.int64)
        n_ok = offs_n[:, None] < seq_k
        k = tl.load(K + krows[:, None] * stride_kn + offs_d[None, :], mask=n_ok & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + krows[:, None] * stride_vn + offs_dv[None, :], mask=n_ok & (offs_dv[None, :] < DV), other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # (BLOCK_N, BLOCK_D)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)  # (BLOCK_N, BLOCK_DV)

        # Query rows that can see these keys: [lo, hi) (key j is seen by i in [j - diag - right, j - diag + left]).
        lo = 0
        hi = seq_q
        if WIN_RIGHT:
            lo = tl.maximum(start * BLOCK_N - diag - window_right, 0) // BLOCK_M * BLOCK_M
        if WIN_LEFT:
            hi = tl.minimum(start * BLOCK_N + BLOCK_N - diag + window_left, seq_q)

        for g in range(0, GROUP):
            off_hq = off_hk * GROUP + g
            q_base = _bh(Q, off_b, off_hq, stride_qb, stride_qh)
            do_base = _bh(DO, off_b, off_hq, stride_gb, stride_gh)
            l_base = _lse_bh(Lse, off_b, off_hq, Hkv * GROUP, Lq, IS_VARLEN)
            d_base = _lse_bh(Delta, off_b, off_hq, Hkv * GROUP, Lq, IS_VARLEN)
            m_base = _bh(Mask, off_b, off_hq, stride_mb, stride_mh)
            for start_m in range(lo, hi, BLOCK_M):
                rows = start_m + offs_m
                q, do, lse, delta = _bwd_query_rows(
                    q_base,
                    do_base,
                    l_base,
                    d_base,
                    rows,
                    (q_start + rows).to(tl.int64),
                    seq_q,
                    offs_d,
                    offs_dv,
                    D,
                    DV,
                    stride_qm,
                    stride_gm,
                )
                sT, tT = _scores(
                    mma(k, tl.trans(q), None),
                    rows[None, :],
                    offs_n[:, None],
                    seq_q,
                    seq_k,
                    diag,
                    m_base + rows[None, :].to(tl.int64) * stride_mm + offs_n[:, None] * stride_mn,
                    scale,
                    softcap,
                    window_left,
                    window_right,
                    HAS_MASK,
                    SOFTCAP,
                    WIN_LEFT,
                    WIN_RIGHT,
                )
                pT = exp_via_exp2(sT - lse[None, :])  # (BLOCK_N, BLOCK_M)
                dv = mma(pT, do, dv)
                dsT = _bwd_ds(pT, mma(v, tl.trans(do), None), delta[None, :], tT, SOFTCAP)
                dk = mma(dsT, q, dk)

        dk *= scale
        DK, stride_dkn = _rows_bh(DK, off_b, off_hk, Hkv, Lk, D, IS_VARLEN)
        DV_, stride_dvn = _rows_bh(DV_, off_b, off_hk, Hkv, Lk, DV, IS_VARLEN)
        tl.store(
            DK + krows[:, None] * stride_dkn + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=n_ok & (offs_d[None, :] < D),
        )
        tl.store(
            DV_ + krows[:, None] * stride_dvn + offs_dv[None, :],
            dv.to(DV_.dtype.element_ty),
            mask=n_ok & (offs_dv[None, :] < DV),
        )
    else:
        if start * BLOCK_M >= seq_q:
            return
        H = tl.num_programs(1)
        offs_m = start * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        qrows = (q_start + offs_m).to(tl.int64)
        q, do, lse, delta = _bwd_query_rows(
            _bh(Q, off_b, off_h, stride_qb, stride_qh),
            _bh(DO, off_b, off_h, stride_gb, stride_gh),
            _lse_bh(Lse, off_b, off_h, H, Lq, IS_VARLEN),
            _lse_bh(Delta, off_b, off_h, H, Lq, IS_VARLEN),
            offs_m,
            qrows,
            seq_q,
            offs_d,
            offs_dv,
            D,
            DV,
            stride_qm,
            stride_gm,
        )
        kT_ptrs = K + (k_start + offs_n[None, :]).to(tl.int64) * stride_kn + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
        vT_ptrs = V + (k_start + offs_n[None, :]).to(tl.int64) * stride_vn + offs_dv[:, None]  # (BLOCK_DV, BLOCK_N)
        mask_ptrs = (
            _bh(Mask, off_b, off_h, stride_mb, stride_mh)
            + offs_m[:, None].to(tl.int64) * stride_mm
            + offs_n[None, :] * stride_mn
        )
        lo, hi = _key_range(start, seq_k, diag, window_left, window_right, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kT = tl.load(kT_ptrs + start_n * stride_kn, mask=(cols[None, :] < seq_k) & (offs_d[:, None] < D), other=0.0)
            vT = tl.load(
                vT_ptrs + start_n * stride_vn, mask=(cols[None, :] < seq_k) & (offs_dv[:, None] < DV), other=0.0
            )
            s, t = _scores(
                mma(q, kT, None),
                offs_m[:, None],
                cols[None, :],
                seq_q,
                seq_k,
                diag,
                mask_ptrs + start_n * stride_mn,
                scale,
                softcap,
                window_left,
                window_right,
                HAS_MASK,
                SOFTCAP,
                WIN_LEFT,
                WIN_RIGHT,
            )
            p = exp_via_exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
            ds = _bwd_ds(p, mma(do, vT, None), delta[:, None], t, SOFTCAP)
            dq = mma(ds, tl.trans(kT), dq)
        dq *= scale
        DQ, stride_dqm = _rows_bh(DQ, off_b, off_h, H, Lq, D, IS_VARLEN)
        tl.store(
            DQ + qrows[:, None] * stride_dqm + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < D),
        )


# ================================================================================================================
# autotune configs
# ================================================================================================================
# Keyed on (padded head dim, causal, dtype): the autotuner adds every tensor argument's dtype to the key, and
# the config lists are picked per head-dim bucket below, so the search is a handful of configs. Block sizes shrink
# with the head dim because the Q tile (forward) or the dK/dV accumulators (backward) live in registers.
# Triton caches the winner per key for the life of the process.


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_FWD_CONFIGS = {
    64: [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 4), _cfg(64, 32, 4, 2)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
    256: [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2), _cfg(32, 32, 4, 1)],
}
_BWD_CONFIGS = {
    64: [_cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 128, 8, 2), _cfg(32, 32, 4, 1)],
    128: [_cfg(64, 64, 8, 2), _cfg(32, 64, 4, 2), _cfg(32, 128, 8, 2), _cfg(32, 32, 4, 1)],
    256: [_cfg(32, 64, 8, 1), _cfg(32, 32, 4, 1), _cfg(64, 32, 8, 1), _cfg(16, 32, 4, 1)],
}
_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}  # the interpreter pays per block op: few blocks
_KEY = ["HEAD_DIM_KEY", "CAUSAL_KEY"]


def _bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


_SMEM_LIMIT = 200 * 1024  # bytes; H100 allows 227 KiB per block, the estimates below run ~10% low


def _fwd_smem(cfg, block_d, elem):  # the Q tile plus num_stages buffered K and V tiles
    return elem * (cfg.kwargs["BLOCK_M"] * block_d + cfg.num_stages * cfg.kwargs["BLOCK_N"] * 2 * block_d)


def _bwd_smem(cfg, block_d, elem):  # the K and V tiles plus num_stages buffered Q and dO tiles
    return elem * 2 * block_d * (cfg.kwargs["BLOCK_N"] + max(cfg.num_stages, 1) * cfg.kwargs["BLOCK_M"])


def _autotuned(fn, configs, smem):
    """One autotuned kernel per (head-dim bucket, element size): the configs whose tiles fit in shared memory
    (float32 tiles are twice as large; at least the smallest config is kept)."""
    kernels = {}
    for bucket, cfgs in configs.items():
        for elem in (2, 4):
            if INTERPRET:
                kernels[bucket, elem] = fn
                continue
            fit = [c for c in cfgs if smem(c, bucket, elem) <= _SMEM_LIMIT] or [
                min(cfgs, key=lambda c: smem(c, bucket, elem))
            ]
            kernels[bucket, elem] = triton.autotune(configs=fit, key=_KEY)(fn)
    return kernels


_FWD_KERNELS = _autotuned(_attn_fwd, _FWD_CONFIGS, _fwd_smem)
_DKDV_KERNELS = _autotuned(_attn_bwd, _BWD_CONFIGS, _bwd_smem)  # launched with DKDV_PASS=True
_DQ_KERNELS = _autotuned(_attn_bwd, _BWD_CONFIGS, _bwd_smem)  # and False: one autotuner (cache) per pass


# ================================================================================================================
# launchers
# ================================================================================================================


def _grid(n_rows: int, heads: int, batch: int, block_key: str):
    if INTERPRET:
        return (triton.cdiv(n_rows, _INTERPRET_CONFIG[block_key]), heads, batch)
    return lambda meta: (triton.cdiv(n_rows, meta[block_key]), heads, batch)


def _blocks() -> dict:
    return dict(_INTERPRET_CONFIG) if INTERPRET else {}


def _normalize_window(w: int, limit: int) -> int:
    # A side wider than Lq + Lk hides nothing: same as unbounded (keeps huge windows out of int32 math).
    return -1 if w < 0 or w > limit else int(w)


def _flags(D, Dv, window_left, window_right, bottom_right, softcap, has_mask, is_varlen):
    block_d, block_dv = pow2(D), pow2(Dv)
    return dict(
        HEAD_DIM_KEY=max(block_d, block_dv),
        CAUSAL_KEY=window_right == 0,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        IS_VARLEN=is_varlen,
        BOTTOM_RIGHT=bottom_right,
        HAS_MASK=has_mask,
        SOFTCAP=softcap > 0,
        WIN_LEFT=window_left >= 0,
        WIN_RIGHT=window_right >= 0,
    )


def _prepare_mask(attn_mask, B, Hq, Lq, Lk):
    """attn_mask -> (tensor, strides) for the kernels: additive, broadcast with stride 0 to (B, Hq, Lq, Lk).
    Float masks are read in their own dtype and layout; bool masks become additive float32 (0 / -inf)."""
    if attn_mask is None:
        return None, (0, 0, 0, 0)
    m = attn_mask
    if m.dtype == torch.bool:
        m = torch.where(m, 0.0, float("-inf")).to(torch.float32)
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).expand(B, Hq, Lq, Lk)
    return m, tuple(m.stride())


def _unit_last(t):
    """t with a unit head-dim stride (the kernels assume it; a copy only for the rare input without one)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _strides(t, is_varlen):
    """(batch, head, row) strides: dense (B, H, L, D); varlen (total, H, D) with batch stride 0."""
    return (0, t.stride(1), t.stride(0)) if is_varlen else tuple(t.stride()[:3])


def _rows(t, is_varlen):
    """Rows per (batch, head) of a q/k-shaped tensor: L (dense), total (varlen: lse's row length)."""
    return t.shape[0] if is_varlen else t.shape[2]


def _fwdlaunch(
    q,
    k,
    v,
    mask,
    mask_strides,
    cu_q,
    cu_k,
    B,
    Hq,
    Hkv,
    max_q,
    scale,
    window_left,
    window_right,
    bottom_right,
    softcap,
    is_varlen,
):
    D, Dv = q.shape[-1], v.shape[-1]
    if is_varlen:
        out = q.new_empty((q.shape[0], Hq, Dv))  # (total_q, Hq, Dv)
        lse = q.new_empty((Hq, q.shape[0]), dtype=torch.float32)  # (Hq, total_q)
    else:
        out = q.new_empty((B, Hq, q.shape[2], Dv))
        lse = q.new_empty((B, Hq, q.shape[2]), dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if out.numel() == 0 or lse.numel() == 0 or max_q == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    flags = _flags(D, Dv, window_left, window_right, bottom_right, softcap, mask is not None, is_varlen)
    kernel = _FWD_KERNELS[_bucket(flags["HEAD_DIM_KEY"]), q.element_size()]
    launch(kernel)[_grid(max_q, Hq, B, "BLOCK_M")](
        q,
        k,
        v,
        mask if mask is not None else q,
        out,
        lse,
        cu_q,
        cu_k,
        *_strides(q, is_varlen),
        *_strides(k, is_varlen),
        *_strides(v, is_varlen),
        *mask_strides,
        _rows(q, is_varlen),
        _rows(k, is_varlen),
        Hq // Hkv,
        D,
        Dv,
        scale,
        softcap if softcap > 0 else 1.0,
        window_left,
        window_right,
        **flags,
        **_blocks(),
    )
    return out, lse


def _bwdlaunch(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    grad_lse,
    mask,
    mask_strides,
    cu_q,
    cu_k,
    B,
    Hq,
    Hkv,
    max_q,
    max_k,
    scale,
    window_left,
    window_right,
    bottom_right,
    softcap,
    is_varlen,
):
    D, Dv = q.shape[-1], v.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the kernels store them
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if max_k == 0 or k.numel() == 0:  # no key at all: every output row was 0 and lse -inf
        return dq.zero_(), dk.zero_(), dv.zero_()
    if max_q == 0 or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, out, grad_out = (_unit_last(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()  # lse, grad_lse and delta: contiguous, addressed by the kernels from their shape
    grad_lse = grad_lse.contiguous() if grad_lse is not None else None
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    Lq, Lk = _rows(q, is_varlen), _rows(k, is_varlen)
    pre_block = 16 if INTERPRET else 64
    launch(_attn_bwd_preprocess)[(triton.cdiv(max_q, pre_block), Hq, B)](
        out,
        grad_out,
        grad_lse if grad_lse is not None else lse,
        delta,
        cu_q,
        *_strides(out, is_varlen),
        *_strides(grad_out, is_varlen),
        Lq,
        Dv,
        IS_VARLEN=is_varlen,
        HAS_GLSE=grad_lse is not None,
        BLOCK_M=pre_block,
        BLOCK_DV=pow2(Dv),
    )
    flags = _flags(D, Dv, window_left, window_right, bottom_right, softcap, mask is not None, is_varlen)
    bucket = (_bucket(flags["HEAD_DIM_KEY"]), q.element_size())
    args = (
        q,
        k,
        v,
        mask if mask is not None else q,
        grad_out,
        lse,
        delta,
        dq,
        dk,
        dv,
        cu_q,
        cu_k,
        *_strides(q, is_varlen),
        *_strides(k, is_varlen),
        *_strides(v, is_varlen),
        *mask_strides,
        *_strides(grad_out, is_varlen),
        Lq,
        Lk,
        Hq // Hkv,
        D,
        Dv,
        scale,
        softcap if softcap > 0 else 1.0,
        window_left,
        window_right,
    )
    launch(_DKDV_KERNELS[bucket])[_grid(max_k, Hkv, B, "BLOCK_N")](*args, **flags, DKDV_PASS=True, **_blocks())
    launch(_DQ_KERNELS[bucket])[_grid(max_q, Hq, B, "BLOCK_M")](*args, **flags, DKDV_PASS=False, **_blocks())
    return dq, dk, dv


# ================================================================================================================
# torch ops
# ================================================================================================================


def _attention_fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    mask, mask_strides = _prepare_mask(attn_mask, B, Hq, Lq, Lk)
    limit = Lq + Lk
    return _fwdlaunch(
        q,
        k,
        v,
        mask,
        mask_strides,
        q,
        q,
        B,
        Hq,
        Hkv,
        Lq,
        scale,
        _normalize_window(window_left, limit),
        _normalize_window(window_right, limit),
        bottom_right,
        softcap,
        False,
    )


def _attention_bwd_impl(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
    grad_lse: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    mask, mask_strides = _prepare_mask(attn_mask, B, Hq, Lq, Lk)
    limit = Lq + Lk
    return _bwdlaunch(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        grad_lse,
        mask,
        mask_strides,
        q,
        q,
        B,
        Hq,
        Hkv,
        Lq,
        Lk,
        scale,
        _normalize_window(window_left, limit),
        _normalize_window(window_right, limit),
        bottom_right,
        softcap,
        False,
    )


def _varlen_fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    nseq = cu_seqlens_q.shape[0] - 1
    limit = max_seqlen_q + max_seqlen_k
    return _fwdlaunch(
        q,
        k,
        v,
        None,
        (0, 0, 0, 0),
        cu_seqlens_q,
        cu_seqlens_k,
        nseq,
        q.shape[1],
        k.shape[1],
        max_seqlen_q,
        scale,
        _normalize_window(window_left, limit),
        _normalize_window(window_right, limit),
        True,
        softcap,
        True,
    )


def _varlen_bwd_impl(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    grad_lse: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nseq = cu_seqlens_q.shape[0] - 1
    limit = max_seqlen_q + max_seqlen_k
    return _bwdlaunch(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        grad_lse,
        None,
        (0, 0, 0, 0),
        cu_seqlens_q,
        cu_seqlens_k,
        nseq,
        q.shape[1],
        k.shape[1],
        max_seqlen_q,
        max_seqlen_k,
        scale,
        _normalize_window(window_left, limit),
        _normalize_window(window_right, limit),
        True,
        softcap,
        True,
    )


register_op("triton_attention_fwd", _attention_fwd_impl)
register_op("triton_attention_bwd", _attention_bwd_impl)
register_op("triton_varlen_fwd", _varlen_fwd_impl)
register_op("triton_varlen_bwd", _varlen_bwd_impl)
# Fake impls (under the interpreter; triton_op derives its own on a GPU) and autograd: the same set as the C++ ops'
register_attention_pair("triton_attention_fwd", "triton_attention_bwd", "dense", fake=INTERPRET)
register_attention_pair("triton_varlen_fwd", "triton_varlen_bwd", "varlen", fake=INTERPRET)


# ================================================================================================================
# entry points
# ================================================================================================================


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention through ``torch.ops.fusedattn.triton_attention_fwd``; differentiable in q, k, v (and
    through lse). Same arguments and semantics as ``torch.ops.fusedattn.attention_fwd``: q (B, Hq, Lq, D),
    k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; attn_mask bool or additive, broadcastable to
    (B, Hq, Lq, Lk). Returns out (B, Hq, Lq, Dv) in q's dtype and lse (B, Hq, Lq) float32."""
    return torch.ops.fusedattn.triton_attention_fwd(
        q, k, v, attn_mask, float(scale), int(window_left), int(window_right), bool(bottom_right), float(softcap)
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length attention (``flash_attn_varlen_func``'s layout) through
    ``torch.ops.fusedattn.triton_varlen_fwd``; differentiable in q, k, v (and through lse).

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); sequence b is rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` (int32, (nseq + 1,)). causal / window are bottom-right aligned per sequence
    (causal sets window_right = 0). Returns out (total_q, Hq, Dv) and lse (Hq, total_q) float32. Arguments are
    expected to be validated by the caller (fusedattn's public varlen API)."""
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0
    return torch.ops.fusedattn.triton_varlen_fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        float(scale),
        left,
        right,
        float(softcap),
    )
