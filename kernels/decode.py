"""KV-cache decoding in Triton (FlashDecoding-style split-KV): kernels, launchers and the torch ops.

Ops (registered when this module is imported; fusedattn/decode.py imports it when Triton can run):

    fusedattn::triton_decode_fwd(q, k_cache!, v_cache!, cache_seqlens, k_new?, v_new?, block_table?,
                                 cache_batch_idx?, scale, window_left, window_right, softcap, num_splits)
        -> (out (B, Lq, Hq, Dv), lse (B, Hq, Lq) float32)
    fusedattn::triton_merge_attention_states(out_a, lse_a, out_b, lse_b) -> (out, lse)

Same arguments and semantics as the C++ ``fusedattn::decode_fwd`` / ``merge_attention_states``
(csrc/torch_bindings.cpp): query i of Lq sees key j of the Lk = cache_seqlens[b] + Lnew keys iff
``Lk - Lq + i - window_left <= j <= Lk - Lq + i + window_right`` (-1 = unbounded; causal = window_right 0).

Three kernels:
  * ``_append_kv``: writes k_new / v_new into the caches in place at cache_seqlens (contiguous or paged).
  * ``_decode_split_kv``: grid (B, Hkv, split). A program owns one kv head of one sequence and one key range
    (split). Decoding is memory-bound (each cache element serves only GROUP*Lq query rows), so the program
    loads each K/V block once for *all* GROUP*Lq query rows of its kv head (GQA query heads x query positions
    stacked as the M dimension of the tile), runs the online softmax over its key range and writes a
    normalized partial output and its log-sum-exp.
  * ``_combine_lse``: merges the per-split states by log-sum-exp (also the merge_attention_states op).

On a real GPU the ops are ``torch.library.triton_op`` (torch.compile sees the kernels); under the interpreter
(TRITON_INTERPRET=1, CPU tensors) they are opaque ``torch.library.custom_op``s, since triton_op's tracing
does not run interpreted kernels (both through ``_common.register_op``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton  # noqa: F401 (the GPU launcher; tests pass it to _decode_impl)

from fusedattn import checks
from fusedattn.checks import MAX_SPLITS  # the one bound on num_splits (= the C++ op's)

from ._common import INTERPRET, exp_via_exp2, launch, log_via_log2, mma, pow2, register_op, softcap_scores

# Split heuristic (num_splits = 0), FlashDecoding style: the (B, Hkv) programs alone leave most SMs idle at
# small batch, so split each sequence's keys until there are about WAVES_PER_SM programs per SM -- but keep
# at least MIN_KEYS_PER_SPLIT keys per split, below which writing and merging the partial states costs more
# than the extra parallelism gains.
WAVES_PER_SM = 2
MIN_KEYS_PER_SPLIT = 256
INTERPRET_SMS = 2  # the interpreter has no SMs: a fixed count (a small split number, so splits are exercised)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda" or INTERPRET:
        return INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits_heuristic(batch_heads: int, max_keys: int, num_sms: int) -> int:
    """Splits per (sequence, kv head) so that batch_heads * splits ~ WAVES_PER_SM * num_sms programs, each
    with >= MIN_KEYS_PER_SPLIT keys; 1 when the batch alone fills the machine or the sequences are short."""
    target = WAVES_PER_SM * max(num_sms, 1)
    want = -(-target // max(batch_heads, 1))
    affordable = max(1, max_keys // MIN_KEYS_PER_SPLIT)
    return int(max(1, min(want, affordable, MAX_SPLITS)))


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _append_kv(
    K,
    V,
    KN,
    VN,
    SEQLENS,
    BT,
    CBI,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_knb,
    stride_knl,
    stride_knh,
    stride_knd,
    stride_vnb,
    stride_vnl,
    stride_vnh,
    stride_vnd,
    stride_btb,
    Lnew,
    D,
    DV,
    page_size,
    num_rows,
    capacity,
    PAGED: tl.constexpr,
    HAS_CBI: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """k_cache[seq b, position cache_seqlens[b] + t, head h] = k_new[b, t, h] (and v). Grid (B, Lnew, Hkv)."""
    b = tl.program_id(0)
    t = tl.program_id(1)
    h = tl.program_id(2)
    seqlen = tl.load(SEQLENS + b)
    seqlens = seqlen + tl.zeros([1], dtype=tl.int32)  # (1,): vector compares (see _decode_split_kv)
    in_range = (seqlens >= 0) & (seqlens + Lnew <= capacity)
    j = tl.where(in_range, seqlens + t, 0)
    # where position j lives (see _decode_split_kv)
    if PAGED:
        row = tl.load(BT + b.to(tl.int64) * stride_btb + j // page_size, mask=in_range, other=-1)
        slot = j % page_size
    else:
        if HAS_CBI:
            row = tl.load(CBI + b) + tl.zeros_like(j)
        else:
            row = b + tl.zeros_like(j)
        slot = j
    ok = in_range & (row >= 0) & (row < num_rows)
    offs_k = row.to(tl.int64) * stride_kb + slot.to(tl.int64) * stride_kl
    offs_v = row.to(tl.int64) * stride_vb + slot.to(tl.int64) * stride_vl
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    src = b.to(tl.int64) * stride_knb + t.to(tl.int64) * stride_knl + h.to(tl.int64) * stride_knh
    k = tl.load(KN + src + d * stride_knd, mask=d < D)
    tl.store(K + offs_k + h.to(tl.int64) * stride_kh + d[None, :], k[None, :], mask=ok[:, None] & (d < D)[None, :])
    src = b.to(tl.int64) * stride_vnb + t.to(tl.int64) * stride_vnl + h.to(tl.int64) * stride_vnh
    v = tl.load(VN + src + dv * stride_vnd, mask=dv < DV)
    tl.store(V + offs_v + h.to(tl.int64) * stride_vh + dv[None, :], v[None, :], mask=ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _decode_split_kv(
    Q,
    K,
    V,
    SEQLENS,
    BT,
    CBI,
    O,
    LSE,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_btb,
    stride_os,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_ls,
    stride_lb,
    stride_lh,
    Lq,
    Lnew,
    D,
    DV,
    page_size,
    num_rows,
    capacity,
    scale,
    softcap,
    window_left,
    window_right,
    num_splits,
    GROUP: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_CBI: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One (sequence b, kv head h, split) program. Tile rows r < GROUP*Lq are the query rows that read kv
    head h: query head h*GROUP + r // Lq at position r % Lq. Writes O[split, b, i, head, :] (normalized over
    this split's keys; the last dim contiguous) and LSE[split, b, head, i] (natural log; -inf: no key)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)

    # ---- the rows of the tile: (BLOCK_M,)
    r = tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * Lq
    i = r % Lq  # query position
    head = h * GROUP + r // Lq  # query head
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = (
        Q
        + b.to(tl.int64) * stride_qb
        + i[:, None].to(tl.int64) * stride_ql
        + head[:, None].to(tl.int64) * stride_qh
        + d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (d < D)[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    # ---- the keys each row sees (bottom-right band), and this split's share of their union
    seqlen = tl.load(SEQLENS + b)
    Lk = seqlen + Lnew
    len_ok = (seqlen >= 0) & (Lk <= capacity)  # false only if the op's value checks were skipped
    Lk = tl.where(len_ok, Lk, 0)
    diag = Lk - Lq + i  # (BLOCK_M,) the key aligned with query i
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    hi = tl.zeros([BLOCK_M], dtype=tl.int32) + Lk
    if window_left >= 0:
        lo = tl.maximum(lo, diag - window_left)
    if window_right >= 0:
        hi = tl.minimum(hi, tl.maximum(diag + window_right + 1, 0))
    # lo and hi grow with i: the union is [lo(row 0), hi(row Lq - 1))
    k_lo = tl.min(tl.where(row_ok, lo, Lk), axis=0)
    k_hi = tl.maximum(tl.max(tl.where(row_ok, hi, 0), axis=0), k_lo)
    chunk = tl.cdiv(tl.cdiv(k_hi - k_lo, num_splits), BLOCK_N) * BLOCK_N  # whole blocks per split
    start = tl.minimum(k_lo + split * chunk, k_hi)
    end = tl.minimum(start + chunk, k_hi)

    if HAS_CBI:
        cache_row = tl.load(CBI + b)
    else:
        cache_row = b

    # ---- online softmax over [start, end) in blocks of BLOCK_N keys (scores in natural units: see _common.LOG2E)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # rows that met a non-existent page or cache row, or a sequence length past the capacity
    bad = tl.zeros([BLOCK_M], dtype=tl.int32) + tl.where(len_ok, 0, 1)
    for n0 in range(start, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        key_ok = j < end
        # Where the keys live. Contiguous: row cache_batch_idx[b] (or b), slot j. Paged: page
        # block_table[b, j // page_size], slot j % page_size -- per key, so any page size works (not only
        # powers of two). A row outside the cache (possible only when the op's value checks were skipped
        # under torch.compile) is never read: ok = False, and the output row becomes NaN.
        if PAGED:
            row = tl.load(BT + b.to(tl.int64) * stride_btb + j // page_size, mask=key_ok, other=0)
            slot = j % page_size
        else:
            row = cache_row + tl.zeros_like(j)  # vector compares: the interpreter mishandles scalar & vector bools
            slot = j
        ok = (row >= 0) & (row < num_rows)
        load_ok = key_ok & ok
        offs_k = row.to(tl.int64) * stride_kb + slot.to(tl.int64) * stride_kl
        offs_v = row.to(tl.int64) * stride_vb + slot.to(tl.int64) * stride_vl
        # k: (BLOCK_N, BLOCK_D), read once for all BLOCK_M rows (GQA heads x query positions)
        k = tl.load(
            K + offs_k[:, None] + h.to(tl.int64) * stride_kh + d[None, :],
            mask=load_ok[:, None] & (d < D)[None, :],
            other=0.0,
        )
        s, _ = softcap_scores(mma(q, tl.trans(k), None), scale, softcap, SOFTCAP)  # (BLOCK_M, BLOCK_N) fp32
        visible = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]) & key_ok[None, :] & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        bad = bad | tl.max((visible & (ok == 0)[None, :]).to(tl.int32), axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep everything 0
        alpha = exp_via_exp2(m - m_safe)
        p = exp_via_exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + offs_v[:, None] + h.to(tl.int64) * stride_vh + dv[None, :],
            mask=load_ok[:, None] & (dv < DV)[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        acc = acc * alpha[:, None] + mma(p, v, None)  # P rounded to the input dtype, as in FlashAttention
        m = m_new

    # ---- normalized partial state; no key: out 0, lse -inf; a bad index: NaN (visible, never a stray access)
    has = l > 0
    l_safe = tl.where(has, l, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, m + log_via_log2(l_safe), float("-inf"))
    poison = bad > 0
    out = tl.where(poison[:, None], float("nan"), out)
    lse = tl.where(poison, float("nan"), lse)
    o_ptrs = (
        O
        + split.to(tl.int64) * stride_os
        + b.to(tl.int64) * stride_ob
        + i[:, None].to(tl.int64) * stride_ol
        + head[:, None].to(tl.int64) * stride_oh
        + dv[None, :]
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    l_ptrs = LSE + split.to(tl.int64) * stride_ls + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + i
    tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def _combine_lse(
    O_PART,
    LSE_PART,
    O,
    LSE,
    num_states,
    num_rows,
    L,
    H,
    DV,
    stride_ps,
    stride_pb,
    stride_pl,
    stride_ph,
    stride_pd,
    stride_qs,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_lb,
    stride_lh,
    BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """For BLOCK_R rows (b, position, head): out = sum_s e^(lse_s - M) o_s / sum_s e^(lse_s - M) and
    lse = M + log(sum_s e^(lse_s - M)), M = max_s lse_s. A state with lse -inf contributes nothing and its
    o_s is never read (it may be garbage); all -inf: out 0, lse -inf. Grid (cdiv(B * L * H, BLOCK_R),)."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) flat row index
    row_ok = rr < num_rows
    hh = rr % H
    ll = (rr // H) % L
    b = rr // (H * L)
    lse_base = LSE_PART + b.to(tl.int64) * stride_qb + hh.to(tl.int64) * stride_qh + ll.to(tl.int64) * stride_ql
    o_base = O_PART + b.to(tl.int64) * stride_pb + ll.to(tl.int64) * stride_pl + hh.to(tl.int64) * stride_ph
    dv = tl.arange(0, BLOCK_DV)
    # pass 1: the max over states (a NaN state, from a refused index upstream, makes M NaN: stays visible)
    M = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for st in range(0, num_states):
        lse_s = tl.load(lse_base + st * stride_qs, mask=row_ok, other=float("-inf"))
        M = tl.where((lse_s > M) | (lse_s != lse_s), lse_s, M)
    M_safe = tl.where(M == float("-inf"), 0.0, M)
    # pass 2: weights and the weighted sum of the outputs
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for st in range(0, num_states):
        lse_s = tl.load(lse_base + st * stride_qs, mask=row_ok, other=float("-inf"))
        w = exp_via_exp2(lse_s - M_safe)  # -inf: 0
        live = row_ok & (lse_s > float("-inf"))
        o_s = tl.load(
            o_base[:, None] + st * stride_ps + dv[None, :] * stride_pd,
            mask=live[:, None] & (dv < DV)[None, :],
            other=0.0,
        ).to(tl.float32)
        total += w
        acc += w[:, None] * o_s
    has = total > 0
    total_safe = tl.where(has, total, 1.0)
    out = acc / total_safe[:, None]
    lse = tl.where(has, M_safe + log_via_log2(total_safe), float("-inf"))
    lse = tl.where(M != M, M, lse)
    out = tl.where((M != M)[:, None], float("nan"), out)
    o_ptrs = O + b.to(tl.int64) * stride_ob + ll.to(tl.int64) * stride_ol + hh.to(tl.int64) * stride_oh
    tl.store(o_ptrs[:, None] + dv[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(LSE + b.to(tl.int64) * stride_lb + hh.to(tl.int64) * stride_lh + ll, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# launchers (shared by the eager/interpreted op and the triton_op)
# ------------------------------------------------------------------------------------------------
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _err(msg: str) -> RuntimeError:
    return RuntimeError(f"fusedattn (triton): {msg}")


_is_concrete = checks.is_concrete  # plain tensors holding values (not fake / functional ones while compiling)


def _decode_impl(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k_new,
    v_new,
    block_table,
    cache_batch_idx,
    scale,
    window_left,
    window_right,
    softcap,
    num_splits,
    launch,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Checks, appends k_new/v_new in place, runs the split-KV kernel and, for > 1 split, the combine.
    `launch(kernel)` is the kernel itself (eager / interpreter) or wrap_triton(kernel) (triton_op)."""
    # The op's own checks (direct torch.ops calls and compiled graphs skip the Python wrapper's), the rules of
    # fusedattn/checks.py raised as RuntimeErrors: shapes, dtypes, devices, scalars; with concrete tensors the
    # storage under every view and the append's aliasing and in-place rules (those of the C++ op).
    checks.check_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx, err=_err)
    checks.check_append(k_cache, v_cache, k_new, v_new, err=_err)
    if q.dtype not in _FUSED_DTYPES:
        raise _err(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    checks.check_scale(scale, err=_err)
    checks.check_softcap(softcap, err=_err)
    checks.check_window_sizes(window_left, window_right, err=_err)
    checks.check_num_splits(num_splits, err=_err)
    if q.device.type == "cpu" and _is_concrete(cache_seqlens, block_table, cache_batch_idx) and q.shape[0] > 0:
        # Value checks (interpreter, concrete CPU tensors): every index the kernels follow. Not on a GPU (a device
        # sync and a few launches per call would cost a decode step ~5-10%; the public wrapper checks eagerly) nor
        # while tracing: there the kernels refuse bad indices themselves -- no access outside the tensors, and the
        # affected sequence's output and lse are NaN.
        checks.check_decode_indices(
            k_cache, cache_seqlens, 0 if k_new is None else k_new.shape[1], block_table, cache_batch_idx, err=_err
        )
    B, Lq, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    Lnew = 0 if k_new is None else k_new.shape[1]
    out = torch.empty((B, Lq, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    # Pointers for absent optional tensors: any int32 tensor (never read: PAGED / HAS_CBI are constexpr).
    bt = block_table if paged else cache_seqlens
    cbi = cache_batch_idx if cache_batch_idx is not None else cache_seqlens
    BLOCK_D, BLOCK_DV = pow2(D), pow2(Dv)

    if Lnew > 0 and B > 0 and Hkv > 0:
        launch(_append_kv)[(B, Lnew, Hkv)](
            k_cache,
            v_cache,
            k_new,
            v_new,
            cache_seqlens,
            bt,
            cbi,
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            *k_new.stride(),
            *v_new.stride(),
            bt.stride(0) if paged else 0,
            Lnew,
            D,
            Dv,
            page_size,
            k_cache.shape[0],
            capacity,
            PAGED=paged,
            HAS_CBI=cache_batch_idx is not None,
            BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV,
        )
    if B == 0 or Lq == 0 or Hq == 0:
        return out, lse

    group = Hq // Hkv
    BLOCK_M = pow2(group * Lq)
    # Keys per block: K and V tiles of BLOCK_N x D (<= 32 KiB each) beside the (BLOCK_M, BLOCK_DV) fp32
    # accumulator. (The interpreter runs each block as numpy calls: larger blocks, fewer Python iterations.)
    BLOCK_N = 64 if max(BLOCK_D, BLOCK_DV) * q.element_size() <= 256 and BLOCK_M <= 64 else 32
    if INTERPRET:
        BLOCK_N = 128
    # A window side wider than capacity + Lq hides no key (keys sit in [0, capacity), the diagonal within it):
    # unbounded. Keeps sides near 2**63 (sys.maxsize as "unbounded") from overflowing diag + window_right + 1.
    window_left, window_right = (-1 if w > capacity + Lq else w for w in (window_left, window_right))
    # The key span one program may cover: from shapes only (no device sync, traceable).
    max_keys = capacity
    if window_left >= 0:
        max_keys = min(max_keys, window_left + Lq + max(window_right, 0))
    S = num_splits or num_splits_heuristic(B * Hkv, max_keys, _num_sms(q.device))
    # No more splits than key blocks: a program's range is whole BLOCK_N blocks, so splits past
    # cdiv(max_keys, BLOCK_N) would be empty (1024 splits of 16 keys: 1024 partial states, 1023 of them empty).
    # Every sequence (<= max_keys keys) gets one block per split for any S >= that bound: the same partition,
    # the same result.
    S = max(1, min(S, MAX_SPLITS, triton.cdiv(max_keys, BLOCK_N)))
    if S == 1:
        o_part, lse_part = out, lse
        o_strides = (0, *out.stride()[:3])
        l_strides = (0, *lse.stride()[:2])
    else:
        o_part = torch.empty((S, B, Lq, Hq, Dv), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((S, B, Hq, Lq), dtype=torch.float32, device=q.device)
        o_strides = o_part.stride()[:4]
        l_strides = lse_part.stride()[:3]
    launch(_decode_split_kv)[(B, Hkv, S)](
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        bt,
        cbi,
        o_part,
        lse_part,
        *q.stride(),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        bt.stride(0) if paged else 0,
        *o_strides,
        *l_strides,
        Lq,
        Lnew,
        D,
        Dv,
        page_size,
        k_cache.shape[0],
        capacity,
        float(scale),
        float(softcap),
        int(window_left),
        int(window_right),
        S,
        GROUP=group,
        PAGED=paged,
        HAS_CBI=cache_batch_idx is not None,
        SOFTCAP=softcap > 0,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
    )
    if S > 1:
        _launch_combine(launch, o_part, lse_part, out, lse, S)
    return out, lse


def _launch_combine(launch, o_part, lse_part, out, lse, S) -> None:
    """o_part (S, B, L, H, Dv), lse_part (S, B, H, L) -> out (B, L, H, Dv), lse (B, H, L)."""
    _, B, L, H, Dv = o_part.shape
    if B * L * H == 0:
        return
    rows = B * L * H
    # Rows per program: a few on a GPU (one warp-sized tile each); many in the interpreter, where every
    # program costs Python overhead.
    BLOCK_R = 64 if INTERPRET else 4
    launch(_combine_lse)[(triton.cdiv(rows, BLOCK_R),)](
        o_part,
        lse_part,
        out,
        lse,
        S,
        rows,
        L,
        H,
        Dv,
        *o_part.stride(),
        *lse_part.stride(),
        *out.stride()[:3],
        *lse.stride()[:2],
        BLOCK_R=BLOCK_R,
        BLOCK_DV=pow2(Dv),
    )


def _merge_impl(out_a, lse_a, out_b, lse_b, launch) -> Tuple[torch.Tensor, torch.Tensor]:
    checks.check_merge(out_a, lse_a, out_b, lse_b, err=_err)
    if out_a.dtype not in _FUSED_DTYPES:
        raise _err(f"out_a must be float32, bfloat16 or float16, got {out_a.dtype}")
    B, L, H, D = out_a.shape
    out = torch.empty((B, L, H, D), dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=out_a.device)
    # The two states side by side as (2, ...) so that one combine kernel serves both the splits and this merge.
    o_part = torch.stack([out_a, out_b])
    lse_part = torch.stack([lse_a, lse_b])
    _launch_combine(launch, o_part, lse_part, out, lse, 2)
    return out, lse


# ------------------------------------------------------------------------------------------------
# torch ops
# ------------------------------------------------------------------------------------------------

_launch = launch  # the interpreter: the kernel itself; a GPU: wrap_triton


def _decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: Optional[torch.Tensor],
    v_new: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _decode_impl(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new,
        v_new,
        block_table,
        cache_batch_idx,
        scale,
        window_left,
        window_right,
        softcap,
        num_splits,
        launch,
    )


def _decode_fake(q, k_cache, v_cache, *_):  # the shapes follow from q and v_cache
    B, Lq, Hq, _ = q.shape
    return q.new_empty((B, Lq, Hq, v_cache.shape[-1])), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def _merge_op(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _merge_impl(out_a, lse_a, out_b, lse_b, launch)


def _merge_fake(out_a, lse_a, out_b, lse_b):
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape, dtype=torch.float32)


triton_decode_fwd = register_op("triton_decode_fwd", _decode_op, _decode_fake, mutates_args=("k_cache", "v_cache"))
triton_merge_attention_states = register_op("triton_merge_attention_states", _merge_op, _merge_fake)
