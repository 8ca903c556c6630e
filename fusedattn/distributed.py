"""Context-parallel attention over ``torch.distributed``: ring attention on fusedattn's kernels.

Each rank of a process group holds its shard of the sequence (q, k, v of the same tokens). K/V blocks travel
around the ring (rank r sends to r + 1, receives from r - 1) with point-to-point ``batch_isend_irecv``: while
rank r computes attention of its queries against the block it holds, the next block is already in flight. The
partial outputs are merged by log-sum-exp in float32; the backward runs our fused backward per block with the
*global* output and lse (so each block's P is the global softmax restricted to it) and passes the dK/dV
accumulators around the ring with the K/V blocks, as ring-flash-attn does. The engine is torch.distributed
(gloo on CPUs, NCCL on GPUs); there is no communication layer here beyond the ring's send/recv.

    import torch.distributed as dist
    from fusedattn.distributed import ring_attention, shard, unshard

    dist.init_process_group("gloo")  # torchrun --nproc-per-node 4 train.py
    r, W = dist.get_rank(), dist.get_world_size()
    q, k, v = (shard(t, r, W, dim=2, zigzag=True) for t in (q_full, k_full, v_full))  # (B, H, L/W, D) each
    out = ring_attention(q, k, v, causal=True, zigzag=True)     # this rank's shard of the output
    out.sum().backward()                                          # dq, dk, dv of this rank's shard

Sharding (``shard`` / ``unshard``): plain: rank r holds tokens ``[r L/W, (r+1) L/W)``; zigzag (load balance for
causal): the sequence is cut into 2W chunks and rank r holds chunks r and 2W-1-r, so every rank does the same
work. Causal is per block: a block wholly in the past of the queries is attended without a mask, the diagonal
block causally, a block in the future is skipped (for zigzag: the past block's first half, or the queries'
second half against the whole block). Varlen: one global ``cu_seqlens`` (every sequence's length divisible by W,
by 2W for zigzag); each rank holds its shard of every sequence, packed (ring-flash-attn's varlen convention).

``sdpa_for_context_parallel``: our ring under torch's ``torch.distributed.tensor.experimental.context_parallel``
(see its docstring).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import checks, dispatch

__all__ = ["ring_attention", "shard", "unshard", "sdpa_for_context_parallel"]

_KV_TAG, _DKV_TAG = 0, 1  # two exchanges can be in flight at once in the backward: gloo matches them by tag

# When a dict, the ring adds the seconds it spends blocked on communication to _timing["wait_s"] and counts
# the exchanges (the benchmark's communication share); None (the default) records nothing.
_timing: Optional[dict] = None


# ------------------------------------------------------------------------------------------------
# sharding helpers
# ------------------------------------------------------------------------------------------------
def _sequence_shard(x: torch.Tensor, rank: int, world_size: int, dim: int, zigzag: bool) -> torch.Tensor:
    n = x.shape[dim]
    parts = 2 * world_size if zigzag else world_size
    if n % parts:
        raise ValueError(f"the sequence length {n} (dim {dim}) must be divisible by {parts} to shard it")
    chunks = x.chunk(parts, dim)
    if zigzag:
        return torch.cat([chunks[rank], chunks[parts - 1 - rank]], dim)
    return chunks[rank]


def _sequence_unshard(shards: Sequence[torch.Tensor], dim: int, zigzag: bool) -> torch.Tensor:
    if not zigzag:
        return torch.cat(list(shards), dim)
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def _lengths(cu_seqlens: torch.Tensor) -> List[int]:
    cu = cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def shard(
    x: torch.Tensor,
    rank: int,
    world_size: int,
    *,
    dim: int = 2,
    zigzag: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rank ``rank``'s shard of a full sequence tensor (along ``dim``: 2 for (B, H, L, D), 1 for (B, L, H, D)).

    zigzag: rank r gets chunks r and 2W-1-r of 2W (the load balance for causal ring attention). cu_seqlens
    (packed varlen tensors, ``dim`` the token axis, normally 0): every sequence is sharded so, and the shards
    are packed in sequence order."""
    if cu_seqlens is None:
        return _sequence_shard(x, rank, world_size, dim, zigzag)
    segments = x.split(_lengths(cu_seqlens), dim)
    return torch.cat([_sequence_shard(s, rank, world_size, dim, zigzag) for s in segments], dim)


def unshard(
    shards: Sequence[torch.Tensor], *, dim: int = 2, zigzag: bool = False, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The full sequence from every rank's shard (in rank order): the inverse of ``shard``."""
    if cu_seqlens is None:
        return _sequence_unshard(shards, dim, zigzag)
    W = len(shards)
    local = [n // W for n in _lengths(cu_seqlens)]
    per_rank = [s.split(local, dim) for s in shards]
    return torch.cat([_sequence_unshard([p[b] for p in per_rank], dim, zigzag) for b in range(len(local))], dim)


# ------------------------------------------------------------------------------------------------
# the plan: which part of the queries attends to which part of a block, with which band
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Task:
    """One kernel call of a ring step: the query rows ``q_part`` attend to the key rows ``k_part`` (None: all;
    a slice (dense) or an index tensor (varlen) otherwise) under the kernel's top-left band
    ``(window_left, window_right)`` and ``mask`` (dense only); varlen: the parts' cu_seqlens and max lengths."""

    q_part: object
    k_part: object
    window_left: int = -1
    window_right: int = -1
    mask: Optional[torch.Tensor] = None
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    max_q: int = 0
    max_k: int = 0


def _band(Lq: int, Lk: int, d: int, left: int, right: int, device) -> Optional[Tuple[int, int, Optional[torch.Tensor]]]:
    """Query i of a block sees key j iff ``i + d - left <= j <= i + d + right`` (-1 = unbounded side), where d
    = the queries' global start - the keys' global start. As the kernel's top-left window (its diagonal is
    d = 0): (window_left, window_right, None); where a side falls beyond the diagonal (which the kernel's
    window cannot say), a bool mask; None when no query sees any key of the block (the step is skipped)."""
    if left != -1 and d - left > Lk - 1:  # even the last key is left of the first query's band
        return None
    if right != -1 and Lq - 1 + d + right < 0:  # even the last query's band ends before the first key
        return None
    need_l = None if left == -1 else left - d  # the kernel's top-left window: j >= i - window_left
    need_r = None if right == -1 else right + d  # j <= i + window_right
    if (need_l is None or need_l >= 0) and (need_r is None or need_r >= 0):
        wl = -1 if need_l is None or need_l >= Lq - 1 else need_l  # wider than the block: unbounded
        wr = -1 if need_r is None or need_r >= Lk - 1 else need_r
        return wl, wr, None
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if left != -1:
        keep &= j >= i + d - left
    if right != -1:
        keep &= j <= i + d + right
    return -1, -1, keep[None, None]  # (1, 1, Lq, Lk)


def _half_index(local_lengths: List[int], second: bool, device) -> torch.Tensor:
    """Varlen zigzag: the token indices of each sequence's first (or second) half in the local packing."""
    idx, start = [], 0
    for n in local_lengths:
        h = n // 2
        idx.append(torch.arange(start + (h if second else 0), start + (n if second else h)))
        start += n
    return (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)).to(device)


@dataclasses.dataclass
class _Plan:
    """What one rank computes at each ring step: ``tasks(j)`` for the K/V block of rank j."""

    rank: int
    world: int
    causal: bool
    zigzag: bool
    left: int
    right: int
    L: int  # local sequence length (dense) or local token count (varlen)
    device: torch.device
    varlen: Optional[dict] = None  # cu (local), cu_half, max, max_half, first/second half indices

    def tasks(self, j: int) -> List[_Task]:
        r, v = self.rank, self.varlen
        full = dict(cu_q=v["cu"], cu_k=v["cu"], max_q=v["max"], max_k=v["max"]) if v else {}
        if self.causal and self.zigzag:
            if j == r:  # the diagonal block: causal over the local [chunk r, chunk 2W-1-r] order
                return [_Task(None, None, -1, 0, **full)]
            if j < r:  # chunk j is past both query chunks, chunk 2W-1-j the future of both: its first half
                k_part = v["first"] if v else slice(0, self.L // 2)
                extra = dict(cu_q=v["cu"], cu_k=v["cu_half"], max_q=v["max"], max_k=v["max_half"]) if v else {}
                return [_Task(None, k_part, **extra)]
            # j > r: chunk j is the future of chunk r, both chunks of j are past chunk 2W-1-r: the second half
            q_part = v["second"] if v else slice(self.L // 2, self.L)
            extra = dict(cu_q=v["cu_half"], cu_k=v["cu"], max_q=v["max_half"], max_k=v["max"]) if v else {}
            return [_Task(q_part, None, **extra)]
        if v is not None or (self.left == -1 and self.right == -1 and not self.causal) or self.zigzag:
            if not self.causal or j < r:
                return [_Task(None, None, **full)]
            return [_Task(None, None, -1, 0, **full)] if j == r else []
        # dense, plain sharding, with a causal and/or window band placed by the blocks' global offsets
        band = _band(self.L, self.L, (r - j) * self.L, self.left, 0 if self.causal else self.right, self.device)
        return [] if band is None else [_Task(None, None, *band)]


# ------------------------------------------------------------------------------------------------
# the ring
# ------------------------------------------------------------------------------------------------
class _Ring:
    def __init__(self, group):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def exchange(self, tensors: Sequence[torch.Tensor], tag: int):
        """Send ``tensors`` to the next rank and receive the previous rank's into new buffers (in flight
        when this returns): (buffers, requests)."""
        tensors = [t.contiguous() for t in tensors]
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group, tag) for b in bufs]
        return bufs, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(reqs) -> None:
        t0 = time.perf_counter()
        for req in reqs:
            req.wait()
        if _timing is not None:
            _timing["wait_s"] = _timing.get("wait_s", 0.0) + time.perf_counter() - t0
            _timing["exchanges"] = _timing.get("exchanges", 0) + 1


# ------------------------------------------------------------------------------------------------
# parts of tensors: None (all rows), a slice (dense, a range of the sequence) or an index tensor (varlen)
# ------------------------------------------------------------------------------------------------
def _take(x: torch.Tensor, dim: int, part) -> torch.Tensor:
    if part is None:
        return x
    if isinstance(part, slice):
        return x.narrow(dim, part.start, part.stop - part.start)
    return x.index_select(dim, part)


def _add(acc: torch.Tensor, dim: int, part, val: torch.Tensor) -> None:
    if part is None:
        acc.add_(val)
    elif isinstance(part, slice):
        acc.narrow(dim, part.start, part.stop - part.start).add_(val)
    else:
        acc.index_add_(dim, part, val.to(acc.dtype))


def _put(acc: torch.Tensor, dim: int, part, val: torch.Tensor) -> None:
    if part is None:
        acc.copy_(val)
    elif isinstance(part, slice):
        acc.narrow(dim, part.start, part.stop - part.start).copy_(val)
    else:
        acc.index_copy_(dim, part, val)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The non-tensor arguments of one ring attention call (what the autograd Function keeps)."""

    group: object
    causal: bool
    zigzag: bool
    scale: float
    left: int
    right: int
    softcap: float
    backend: str
    cu_seqlens: Optional[torch.Tensor] = None  # global, varlen only

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None


def _make_plan(spec: _Spec, ring: _Ring, q: torch.Tensor) -> _Plan:
    seq_dim = 0 if spec.varlen else 2
    plan = _Plan(ring.rank, ring.world, spec.causal, spec.zigzag, spec.left, spec.right, q.shape[seq_dim], q.device)
    if spec.varlen:
        local = [n // ring.world for n in _lengths(spec.cu_seqlens)]
        cu = torch.tensor([0] + local, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(q.device)
        plan.varlen = dict(cu=cu, max=max(local, default=0))
        if spec.zigzag:
            plan.varlen.update(
                cu_half=torch.div(cu, 2, rounding_mode="floor").to(torch.int32),
                max_half=max(local, default=0) // 2,
                first=_half_index(local, False, q.device),
                second=_half_index(local, True, q.device),
            )
    return plan


def _dims(spec: _Spec) -> Tuple[int, int]:
    """(sequence axis of q/k/v/out, sequence axis of lse): dense (B, H, L, D) / (B, H, L); varlen (T, H, D) /
    (H, T)."""
    return (0, 1) if spec.varlen else (2, 2)


def _lse_like_out(lse: torch.Tensor, spec: _Spec) -> torch.Tensor:
    return (lse.t() if spec.varlen else lse).unsqueeze(-1)


def _merge_into(out_acc, lse_acc, part, blk_out, blk_lse, spec: _Spec) -> None:
    """out_acc/lse_acc (float32) over the rows ``part`` := the log-sum-exp merge with the block's state."""
    sdim, ldim = _dims(spec)
    o, lse = _take(out_acc, sdim, part), _take(lse_acc, ldim, part)
    m = torch.maximum(lse, blk_lse)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both sides -inf: no key yet, weights 0
    wa, wb = torch.exp(lse - m), torch.exp(blk_lse - m)
    total = wa + wb
    new_lse = torch.where(total > 0, m + torch.log(total), torch.full_like(m, -math.inf))
    denom = torch.where(total > 0, total, torch.ones_like(total))
    new_o = (o * _lse_like_out(wa, spec) + blk_out.float() * _lse_like_out(wb, spec)) / _lse_like_out(denom, spec)
    _put(out_acc, sdim, part, new_o)
    _put(lse_acc, ldim, part, new_lse)


def _resolve(spec: _Spec, q: torch.Tensor, v: torch.Tensor, has_mask: bool):
    family = "varlen" if spec.varlen else "attention"
    case = dispatch.Case(q.device, q.dtype, q.shape[-1], v.shape[-1], has_mask=has_mask, softcap=spec.softcap)
    return dispatch.resolve(family, spec.backend, case)


def _block_forward(spec: _Spec, task: _Task, q, k, v):
    sdim, _ = _dims(spec)
    qp, kp, vp = _take(q, sdim, task.q_part), _take(k, sdim, task.k_part), _take(v, sdim, task.k_part)
    op = _resolve(spec, q, v, task.mask is not None).op
    if spec.varlen:
        args = (task.cu_q, task.cu_k, task.max_q, task.max_k, spec.scale, task.window_left, task.window_right)
        return op(qp, kp, vp, *args, True, spec.softcap)
    return op(qp, kp, vp, task.mask, spec.scale, task.window_left, task.window_right, False, spec.softcap)


def _block_backward(spec: _Spec, task: _Task, dout, q, k, v, out, lse):
    sdim, ldim = _dims(spec)
    qp, kp, vp = _take(q, sdim, task.q_part), _take(k, sdim, task.k_part), _take(v, sdim, task.k_part)
    dop, op_ = _take(dout, sdim, task.q_part).contiguous(), _take(out, sdim, task.q_part).contiguous()
    lp = _take(lse, ldim, task.q_part).contiguous()
    entry = _resolve(spec, q, v, task.mask is not None)
    bwd = dispatch.backward_op("varlen" if spec.varlen else "attention", entry.backend)
    wl, wr = task.window_left, task.window_right
    if not spec.varlen:
        return bwd(dop, qp, kp, vp, op_, lp, task.mask, spec.scale, wl, wr, False, spec.softcap, None)
    lens = (task.cu_q, task.cu_k, task.max_q, task.max_k, spec.scale, wl, wr)
    return bwd(dop, qp, kp, vp, op_, lp, *lens, True, spec.softcap, None)


def _ring_forward(spec: _Spec, q, k, v):
    ring = _Ring(spec.group)
    plan = _make_plan(spec, ring, q)
    sdim, ldim = _dims(spec)
    out_shape = list(q.shape)
    out_shape[-1] = v.shape[-1]
    out = torch.zeros(out_shape, dtype=torch.float32, device=q.device)
    lse_shape = (q.shape[1], q.shape[0]) if spec.varlen else q.shape[:3]
    lse = torch.full(lse_shape, -math.inf, dtype=torch.float32, device=q.device)
    kv = (k, v)
    for step in range(ring.world):
        if step + 1 < ring.world:  # the next block travels while this one is computed
            incoming, reqs = ring.exchange(kv, _KV_TAG)
        for task in plan.tasks((ring.rank - step) % ring.world):
            blk_out, blk_lse = _block_forward(spec, task, q, *kv)
            _merge_into(out, lse, task.q_part, blk_out, blk_lse, spec)
        if step + 1 < ring.world:
            ring.wait(reqs)
            kv = tuple(incoming)
    return out.to(q.dtype), lse


def _ring_backward(spec: _Spec, dout, q, k, v, out, lse):
    ring = _Ring(spec.group)
    plan = _make_plan(spec, ring, q)
    sdim, _ = _dims(spec)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = (k, v)
    dkv = None  # the accumulators of the block held now (float32), arriving from the previous rank
    dkv_reqs = None
    for step in range(ring.world):
        if step + 1 < ring.world:
            incoming, kv_reqs = ring.exchange(kv, _KV_TAG)
        dk_blk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv_blk = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for task in plan.tasks((ring.rank - step) % ring.world):
            dq_t, dk_t, dv_t = _block_backward(spec, task, dout, q, *kv, out, lse)
            _add(dq, sdim, task.q_part, dq_t.float())
            _add(dk_blk, sdim, task.k_part, dk_t.float())
            _add(dv_blk, sdim, task.k_part, dv_t.float())
        if dkv_reqs is not None:
            ring.wait(dkv_reqs)
            dk_blk += dkv[0]
            dv_blk += dkv[1]
        if ring.world > 1:  # the block's accumulators follow it to the next rank (the last hop brings ours home)
            dkv, dkv_reqs = ring.exchange((dk_blk, dv_blk), _DKV_TAG)
        else:
            dkv = (dk_blk, dv_blk)
        if step + 1 < ring.world:
            ring.wait(kv_reqs)
            kv = tuple(incoming)
    if dkv_reqs is not None:
        ring.wait(dkv_reqs)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, spec: _Spec):
        return _ring_forward(spec, q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, spec = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.spec, dout.contiguous(), q, k, v, out, lse)
        return dq, dk, dv, None


# ------------------------------------------------------------------------------------------------
# public
# ------------------------------------------------------------------------------------------------
LAYOUTS = ("bhld", "blhd")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    layout: str = "bhld",
    zigzag: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over a sequence sharded across the ranks of ``group`` (default: the world), forward and backward.

    Args:
        q, k, v: this rank's shard (``shard``): layout "bhld" q (B, Hq, L/W, D), k (B, Hkv, L/W, D), v (B, Hkv,
            L/W, Dv); "blhd" the same with L and H swapped (flash-attn's layout). Varlen (``cu_seqlens`` given):
            packed (T/W, Hq, D) / (T/W, Hkv, D) / (T/W, Hkv, Dv), ``layout`` ignored. ``Hq % Hkv == 0`` (GQA:
            K/V travel and are used with Hkv heads, never repeated).
        group: a torch.distributed process group (its ranks form the ring in rank order).
        causal: over global positions (the full sequence's query i sees keys j <= i).
        scale: multiplies q.k; default 1/sqrt(D).
        window: (left, right) sliding window over global positions, -1 = unbounded (dense, plain sharding only).
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        zigzag: the shards are zigzag ones (rank r holds chunks r and 2W-1-r of 2W): balances causal work.
        cu_seqlens: (B + 1,) int32, the *global* cumulative sequence lengths (every length divisible by W, by 2W
            with zigzag), the same on every rank; each rank's q/k/v hold its shard of every sequence, packed.
        return_lse: also return this shard's log-sum-exp, float32 (B, Hq, L/W) (varlen: (Hq, T/W)), not
            differentiable.
        backend: the kernels' backend for every block ("auto", "cpu", "triton", "cuda"; "reference" runs the
            forward only).

    Returns:
        this rank's shard of the output in q's dtype and layout (and lse). Differentiable in q, k, v: the
        backward is collective too (every rank must run it). In bf16/fp16 each gradient is the float32 sum of
        the W blocks' partials, which the block kernel returns in the input dtype: up to W more roundings than
        one process's single call (ring-flash-attn on flash-attn's backward does the same).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs an initialized torch.distributed process group")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    world = dist.get_world_size(group if group is not None else dist.group.WORLD)
    varlen = cu_seqlens is not None
    if not varlen and layout == "blhd":
        for name, t in (("q", q), ("k", k), ("v", v)):
            checks.check_float_tensor(name, t, ndim=4)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if varlen:
        checks.check_cu_seqlens("cu_seqlens", cu_seqlens, q.device)
        lengths = _lengths(cu_seqlens)
        local = [n // world for n in lengths]
        parts = 2 * world if zigzag else world
        bad = [n for n in lengths if n % parts]
        if bad:
            raise ValueError(
                f"cu_seqlens: every sequence length must be divisible by {parts} ({'2 x ' if zigzag else ''}the "
                f"world size {world}), got lengths {bad}"
            )
        local_cu = torch.tensor([0] + local).cumsum(0).to(torch.int32).to(q.device)
        left, right = checks.check_varlen(
            q, k, v, local_cu, local_cu, max(local, default=0), max(local, default=0), scale, window, softcap
        )
        if q.shape[0] != sum(local) or k.shape[0] != sum(local):
            raise ValueError(
                f"q and k must hold this rank's {sum(local)} tokens (cu_seqlens[-1] / world size), got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
    else:
        left, right = checks.check_attention(q, k, v, None, scale, window, softcap)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"q and k must be shards of the same tokens: local lengths q {q.shape[2]}, k {k.shape[2]}")
        if zigzag and q.shape[2] % 2:
            raise ValueError(f"zigzag shards have an even local length (two chunks), got {q.shape[2]}")
    if (left, right) != (-1, -1) and (zigzag or varlen):
        raise ValueError(f"window={window!r}: ring_attention takes a window with dense, plain (non-zigzag) shards only")
    if backend not in dispatch.CHOICES:
        raise ValueError(f"backend must be one of {dispatch.CHOICES}, got {backend!r}")
    spec = _Spec(
        group,
        bool(causal),
        bool(zigzag),
        checks.default_scale(scale, q.shape[-1]),
        left,
        right,
        float(softcap),
        backend,
        cu_seqlens,
    )
    out, lse = _RingAttention.apply(q, k, v, spec)
    if not varlen and layout == "blhd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# under torch's context_parallel
# ------------------------------------------------------------------------------------------------
def sdpa_for_context_parallel(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, zigzag=None
):
    """``torch.nn.functional.scaled_dot_product_attention``'s signature, for torch's
    ``torch.distributed.tensor.experimental.context_parallel``: set it as ``F.scaled_dot_product_attention``
    before entering the context, and the context's SDPA runs our ring over its mesh::

        F.scaled_dot_product_attention = fusedattn.distributed.sdpa_for_context_parallel
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # this rank's shard
        full = context_parallel_unshard(mesh, [out], [2])[0]

    Inside the context torch wraps whatever ``F.scaled_dot_product_attention`` was when it entered: it turns the
    arguments into DTensors sharded on the sequence (dim 2) of the 1-D ``mesh`` and the output back into a local
    tensor. This function takes those DTensors' local shards and runs ``ring_attention`` on the mesh's process
    group, forward and backward; no torch internals are patched (torch's DTensor SDPA handlers are not used, so it
    also runs on CPU tensors with gloo, where torch's own ring has no handler for the CPU SDPA op, and
    non-causal with load balancing, which torch's ring refuses). torch installs its wrapper as
    ``setattr(F, fn.__name__, wrapper)``, so this function's ``__name__`` is "scaled_dot_product_attention"
    (under its own name the wrapper would land on ``F.sdpa_for_context_parallel`` and the SDPA call would attend
    within each rank's shard only); a wrapper of your own must keep that name too. The shards are zigzag when
    torch's load balancer arranged them (head-tail: rank r holds chunks r and 2W-1-r, the same as ``shard``'s
    zigzag): read from torch's ``_cp_options.enable_load_balance``, which context_parallel sets for the duration
    of the context (private, torch 2.13; the switch torch users set to turn load balancing off); ``zigzag=``
    overrides it. Called with plain tensors (outside the context) it is fusedattn's own drop-in.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(query, DTensor):
        from .api import scaled_dot_product_attention

        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask is not None or dropout_p:
        raise ValueError("sdpa_for_context_parallel: attn_mask and dropout_p are not supported in the ring")
    mesh = query.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"sdpa_for_context_parallel needs a 1-D device mesh, got {mesh.ndim}-D")
    if zigzag is None:
        from torch.distributed.tensor.experimental._context_parallel import _attention as _cp

        zigzag = bool(_cp._cp_options.enable_load_balance)
    q, k, v = (t.to_local() if isinstance(t, DTensor) else t for t in (query, key, value))
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(f"query has {q.shape[1]} heads, key {k.shape[1]}: pass enable_gqa=True for GQA")
    return ring_attention(q, k, v, mesh.get_group(), causal=is_causal, scale=scale, zigzag=zigzag)


# torch's context_parallel replaces ``getattr(F, fn.__name__)`` by its wrapper of fn (see the docstring)
sdpa_for_context_parallel.__name__ = "scaled_dot_product_attention"
