"""Argument checks, each rule once: used by the public functions (api.py, varlen.py, decode.py) and by the
host side of the Triton ops (kernels/decode.py).

Every check names the argument and the expected value. The error class is a parameter, ``err`` (a callable
taking the message): the public functions raise ``ValueError``; an op called directly raises what the C++ ops
raise, a ``RuntimeError`` (kernels/decode.py passes its ``_err``).

Compile safety: these run while torch.compile traces the public functions, where a scalar argument may be a
symbolic ``SymFloat`` / ``SymInt`` (``dynamic=True``). ``math.isfinite`` does not trace on one; comparisons do, so
finiteness is checked as ``-inf < x < inf`` (False for nan and +-inf, as ``math.isfinite``). Checks that read
tensor *values* (``check_cu_seqlens_values``, ``check_decode_indices``) are for eager calls only: the callers
skip them while compiling.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

from . import _ops

Err = Callable[[str], Exception]

# The bound on decode's num_splits, shared with the C++ op (csrc), which exports it as build info; 1024 when the
# extension did not load (or predates the export).
MAX_SPLITS: int = int(_ops._BUILD_INFO.get("max_splits", 1024))
WINDOW_MAX = 2**63  # window sizes are int64 in the op schemas: [-1, 2**63), -1 = unbounded


def _finite(x) -> bool:
    return -math.inf < x < math.inf  # math.isfinite, but traceable on a SymFloat (see the module docstring)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------------
# scalars
# ------------------------------------------------------------------------------------------------
def check_scale(scale, err: Err = ValueError) -> None:
    """scale: None (the caller's default, 1/sqrt(D)) or a finite number."""
    if scale is not None and not (isinstance(scale, (int, float)) and _finite(scale)):
        raise err(f"scale must be a finite number or None, got {scale!r}")


def check_softcap(softcap, err: Err = ValueError) -> None:
    if not (isinstance(softcap, (int, float)) and _finite(softcap) and softcap >= 0):
        raise err(f"softcap must be a finite number >= 0, got {softcap!r}")


def check_window_sizes(left, right, err: Err = ValueError) -> None:
    """The window rule of every op: each side an int in [-1, 2**63), -1 = unbounded."""
    if not all(_is_int(w) and -1 <= w < WINDOW_MAX for w in (left, right)):
        raise err(
            f"window must be a pair of ints (left, right), each in [0, 2**63) or -1 for unbounded, "
            f"got {(left, right)!r}"
        )


def check_window(window, err: Err = ValueError) -> Tuple[int, int]:
    """window: a (left, right) pair (tuple or list); returns it as two ints."""
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise err(
            f"window must be a pair of ints (left, right), each in [0, 2**63) or -1 for unbounded, got {window!r}"
        )
    check_window_sizes(window[0], window[1], err)
    return int(window[0]), int(window[1])


def check_scalars(scale, window, softcap, err: Err = ValueError) -> Tuple[int, int]:
    """scale, softcap and window of every flash-style entry point; returns the window as (left, right)."""
    check_scale(scale, err)
    check_softcap(softcap, err)
    return check_window(window, err)


def check_num_splits(num_splits, err: Err = ValueError) -> None:
    if not (_is_int(num_splits) and 0 <= num_splits <= MAX_SPLITS):
        raise err(f"num_splits must be an int in [0, {MAX_SPLITS}] (0 = heuristic), got {num_splits!r}")


def default_scale(scale, head_dim) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------
def check_float_tensor(
    name: str, t, ndim: Optional[int] = None, layout: str = "(B, H, L, D)", err: Err = ValueError
) -> None:
    if not isinstance(t, torch.Tensor):
        raise err(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise err(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise err(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    check_storage(name, t, _memory_err(err))


def check_like(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "q", err: Err = ValueError) -> None:
    """t has ref's dtype and device."""
    if t.dtype != ref.dtype:
        raise err(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise err(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_int32(
    name: str, t, shape: Sequence[Optional[int]], layout: str, device: torch.device, err: Err = ValueError
) -> None:
    """An int32 index tensor on `device` whose shape matches `shape` (None: any size there)."""
    if not isinstance(t, torch.Tensor):
        raise err(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise err(f"{name} must be an int32 tensor, got dtype {t.dtype}")
    if t.device != device:
        raise err(f"{name} must be on q's device {device}, got {t.device}")
    if t.dim() != len(shape) or any(s is not None and t.shape[d] != s for d, s in enumerate(shape)):
        raise err(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    check_storage(name, t, _memory_err(err))


def check_sinks(sinks, q: torch.Tensor, num_heads: int, err: Err = ValueError) -> None:
    """Attention sinks: None, or a floating (num_heads,) tensor on q's device (any float dtype)."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise err(f"sinks must be a torch.Tensor or None, got {type(sinks).__name__}")
    if not sinks.is_floating_point():
        raise err(f"sinks must be a floating-point tensor, got dtype {sinks.dtype}")
    if sinks.dim() != 1 or sinks.shape[0] != num_heads:
        raise err(f"sinks must have shape (Hq,) = ({num_heads},), one logit per query head, got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise err(f"sinks must be on q's device {q.device}, got {sinks.device}")
    check_storage("sinks", sinks, _memory_err(err))


def check_heads(Hq: int, Hkv: int, q_name: str, kv_name: str, err: Err = ValueError) -> None:
    """GQA / MQA: every kv head serves the same number of query heads."""
    if Hkv == 0 or Hq % Hkv != 0:
        raise err(
            f"the number of query heads in {q_name} ({Hq}) must be a multiple of the number of key/value "
            f"heads in {kv_name} ({Hkv})"
        )


def refuse_grad(fn: str, *tensors) -> None:
    """The decode ops are inference-only (no backward)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            f"{fn} is inference-only (it has no backward) but an input requires grad: call it under "
            f"torch.no_grad() or torch.inference_mode(), or detach the inputs"
        )


# ------------------------------------------------------------------------------------------------
# attention (dense, flash-style)
# ------------------------------------------------------------------------------------------------
def check_mask(attn_mask, q: torch.Tensor, full_shape: Tuple[int, ...], err: Err = ValueError) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise err(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise err(f"attn_mask must be bool or floating-point, got dtype {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise err(f"attn_mask must be on {q.device}, got {attn_mask.device}")
    check_storage("attn_mask", attn_mask, _memory_err(err))
    shape = tuple(attn_mask.shape)
    if len(shape) > len(full_shape) or any(m != 1 and m != f for m, f in zip(shape[::-1], full_shape[::-1])):
        raise err(f"attn_mask of shape {shape} does not broadcast to {tuple(full_shape)}")


def check_attention(q, k, v, attn_mask, scale, window, softcap, err: Err = ValueError) -> Tuple[int, int]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), the mask and the scalars; returns (left, right)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, ndim=4, err=err)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise err(f"q, k, v must share a dtype: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise err(f"q, k, v must be on one device: q {q.device}, k {k.device}, v {v.device}")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise err(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise err(f"k head dim {k.shape[3]} != q head dim {D} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise err(f"v must have k's heads and length: k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_heads(Hq, k.shape[1], "q", "k and v", err)
    if attn_mask is not None:
        check_mask(attn_mask, q, (B, Hq, Lq, k.shape[2]), err)
    return check_scalars(scale, window, softcap, err)


# ------------------------------------------------------------------------------------------------
# varlen
# ------------------------------------------------------------------------------------------------
def check_cu_seqlens(name: str, cu, device: torch.device, err: Err = ValueError) -> None:
    if not isinstance(cu, torch.Tensor):
        raise err(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise err(f"{name} must be an int32 tensor, got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise err(f"{name} must be 1-D of shape (B + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise err(f"{name} must be on q's device {device}, got {cu.device}")
    check_storage(name, cu, _memory_err(err))


def check_max_seqlen(name: str, m, err: Err = ValueError) -> None:
    if not _is_int(m) or m < 0:
        raise err(f"{name} must be an int >= 0, got {m!r}")


def check_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, softcap, err: Err = ValueError
) -> Tuple[int, int]:
    """q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), the (B + 1,) cu_seqlens, the max lengths
    and the scalars; returns (left, right)."""
    for name, t, layout in (
        ("q", q, "(total_q, Hq, D)"),
        ("k", k, "(total_k, Hkv, D)"),
        ("v", v, "(total_k, Hkv, Dv)"),
    ):
        check_float_tensor(name, t, ndim=3, layout=layout, err=err)
    for name, t in (("k", k), ("v", v)):
        check_like(name, t, q, err=err)
    total_q, Hq, D = q.shape
    if k.shape[2] != D:
        raise err(f"k head dim {k.shape[2]} != q head dim {D} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if v.shape[:2] != k.shape[:2]:
        raise err(f"v must have k's tokens and heads: k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_heads(Hq, k.shape[1], "q", "k and v", err)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, err)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, err)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise err(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got "
            f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    check_max_seqlen("max_seqlen_q", max_seqlen_q, err)
    check_max_seqlen("max_seqlen_k", max_seqlen_k, err)
    return check_scalars(scale, window, softcap, err)


def check_cu_seqlens_values(
    name: str, cu: torch.Tensor, total: int, tensor_name: str, max_seqlen: int, max_name: str, err: Err = ValueError
) -> None:
    """The value checks (eager only): starts at 0, non-decreasing, ends at the token count, no length above
    max_seqlen. Reads the (small) index tensor: one device sync on CUDA."""
    c = cu.to("cpu", torch.int64)  # (B + 1,)
    if int(c[0]) != 0:
        raise err(f"{name}[0] must be 0, got {int(c[0])}")
    lens = c[1:] - c[:-1]  # (B,)
    bad = (lens < 0).nonzero()
    if bad.numel():
        b = int(bad[0])
        raise err(f"{name} must be non-decreasing, got {name}[{b}] = {int(c[b])} > {name}[{b + 1}] = {int(c[b + 1])}")
    if int(c[-1]) != total:
        raise err(f"the last entry of {name} ({int(c[-1])}) must equal the number of tokens in {tensor_name} ({total})")
    over = (lens > max_seqlen).nonzero()
    if over.numel():
        b = int(over[0])
        raise err(f"{max_name} = {max_seqlen} is less than the length {int(lens[b])} of sequence {b} in {name}")


# ------------------------------------------------------------------------------------------------
# decode and merge
# ------------------------------------------------------------------------------------------------
def check_decode(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx, err: Err = ValueError
) -> None:
    """Shapes, dtypes and devices of a decode call (cache_seqlens already a tensor). No tensor values."""
    check_float_tensor("q", q, 4, "(B, Lq, Hq, D)", err)
    B, Lq, Hq, D = q.shape
    paged = block_table is not None
    layout = "(num_blocks, PAGE_SIZE, Hkv, D)" if paged else "(B_cache, L_max, Hkv, D)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_float_tensor(name, t, 4, layout, err)
        check_like(name, t, q, err=err)
        if t.stride(-1) != 1:
            raise err(f"{name} must have a contiguous last (head) dimension, got strides {t.stride()}")
    Hkv = k_cache.shape[2]
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise err(
            f"v_cache must match k_cache in all but the head dim: k_cache {tuple(k_cache.shape)}, "
            f"v_cache {tuple(v_cache.shape)}"
        )
    if k_cache.shape[3] != D:
        raise err(f"k_cache head dim {k_cache.shape[3]} != q head dim {D}")
    check_heads(Hq, Hkv, "q", "k_cache", err)
    check_int32("cache_seqlens", cache_seqlens, (B,), f"(B,) = ({B},)", q.device, err)
    if (k_new is None) != (v_new is None):
        raise err("k_new and v_new must be given together (or both left None)")
    if k_new is not None:
        check_float_tensor("k_new", k_new, 4, "(B, Lnew, Hkv, D)", err)
        check_float_tensor("v_new", v_new, 4, "(B, Lnew, Hkv, Dv)", err)
        Lnew = k_new.shape[1]
        for name, t, dim in (("k_new", k_new, D), ("v_new", v_new, v_cache.shape[3])):
            check_like(name, t, q, err=err)
            if tuple(t.shape) != (B, Lnew, Hkv, dim):
                raise err(
                    f"{name} must have shape (B, Lnew, Hkv, {'D' if name == 'k_new' else 'Dv'}) = "
                    f"{(B, Lnew, Hkv, dim)}, got {tuple(t.shape)}"
                )
    if paged:
        check_int32("block_table", block_table, (B, None), f"(B, max_blocks) with B = {B}", q.device, err)
        if cache_batch_idx is not None:
            raise err(
                "cache_batch_idx cannot be combined with block_table (a paged cache addresses sequences "
                "through the block table)"
            )
        if k_cache.shape[1] == 0:
            raise err(f"a paged k_cache must have PAGE_SIZE > 0, got shape {tuple(k_cache.shape)}")
    if cache_batch_idx is not None:
        check_int32("cache_batch_idx", cache_batch_idx, (B,), f"(B,) = ({B},)", q.device, err)
    elif not paged and k_cache.shape[0] < B:
        raise err(
            f"k_cache holds {k_cache.shape[0]} sequences but q has batch {B} (pass cache_batch_idx to pick cache rows)"
        )


def check_leftpad(cache_leftpad, cache_seqlens, k_cache, v_cache, block_table, err: Err = ValueError) -> None:
    """cache_leftpad (B,) int32 on the caches' device, contiguous caches only, 0 <= leftpad <= cache_seqlens
    (eager: reads the values), and a cache layout whose positions can be addressed as pages of one stride."""
    if block_table is not None:
        raise err("cache_leftpad is for contiguous caches: a paged cache expresses padding by its block table")
    B = cache_seqlens.shape[0]
    check_int32("cache_leftpad", cache_leftpad, (B,), f"(B,) = ({B},)", cache_seqlens.device, err)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        s0, s1 = t.stride(0), t.stride(1)
        inner = (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)
        if t.numel() and (s1 <= 0 or s0 % s1 or (t.shape[1] > 1 and inner >= s1)):
            raise err(
                f"cache_leftpad needs {name} positions laid out one after another, (B_cache, L_max, Hkv, D) with "
                f"stride(0) a multiple of stride(1) and each position's heads within stride(1); got strides {t.stride()}"
            )
    if not torch.compiler.is_compiling() and B:
        bad = ((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).nonzero()
        if bad.numel():
            b = int(bad[0])
            raise err(
                f"cache_leftpad[{b}] = {int(cache_leftpad[b])} must be in [0, cache_seqlens[{b}] = "
                f"{int(cache_seqlens[b])}]"
            )


def check_rotary(rotary_cos, rotary_sin, q, k_new, err: Err = ValueError) -> None:
    """Rotary tables of a decode call: both or neither; (seqlen_ro, rotary_dim / 2) floating tensors on q's device,
    rotary_dim <= D; they rotate q and k_new, so k_new must be given. No tensor values."""
    if rotary_cos is None and rotary_sin is None:
        return
    if rotary_cos is None or rotary_sin is None:
        raise err("rotary_cos and rotary_sin must be given together (or both left None)")
    if k_new is None:
        raise err("rotary_cos / rotary_sin rotate q and k_new before the append: they need k_new and v_new")
    D = q.shape[-1]
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        check_float_tensor(name, t, 2, "(seqlen_ro, rotary_dim / 2)", err)
        if t.device != q.device:
            raise err(f"{name} must be on q's device {q.device}, got {t.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise err(f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}, got {tuple(rotary_sin.shape)}")
    if not 0 < 2 * rotary_cos.shape[1] <= D:
        raise err(
            f"rotary_cos must have shape (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= head dim {D}, got "
            f"{tuple(rotary_cos.shape)}"
        )


def check_rotary_positions(rotary_cos, cache_seqlens, rows: int, err: Err = ValueError) -> None:
    """Eager only: positions cache_seqlens[b] .. cache_seqlens[b] + rows - 1 exist in the tables."""
    if rows == 0 or cache_seqlens.numel() == 0:
        return
    need = int(cache_seqlens.max()) + rows
    if need > rotary_cos.shape[0]:
        raise err(
            f"rotary_cos has {rotary_cos.shape[0]} positions but the call rotates up to position {need - 1} "
            f"(max cache_seqlens + {rows} - 1)"
        )


def check_decode_indices(
    k_cache, cache_seqlens, Lnew: int, block_table, cache_batch_idx, err: Err = ValueError
) -> None:
    """The value checks (eager only): every position and page the kernels will touch exists. Reads the small
    index tensors (one device sync on CUDA)."""
    lens = cache_seqlens.tolist()  # (B,) ints
    if not lens:
        return
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if min(lens) < 0:
        b = next(i for i, x in enumerate(lens) if x < 0)
        raise err(f"cache_seqlens must be >= 0, got cache_seqlens[{b}] = {lens[b]}")
    if max(lens) + Lnew > capacity:
        b = next(i for i, x in enumerate(lens) if x + Lnew > capacity)
        what = "max_blocks * PAGE_SIZE of block_table and k_cache" if paged else "L_max of k_cache"
        raise err(
            f"cache_seqlens[{b}] + Lnew = {lens[b]} + {Lnew} = {lens[b] + Lnew} exceeds the cache capacity "
            f"{capacity} ({what})"
        )
    if paged:
        num_blocks, page_size = k_cache.shape[0], k_cache.shape[1]
        total = cache_seqlens.to(torch.int64) + Lnew  # (B,) keys after the append
        pages_used = (total + page_size - 1) // page_size  # (B,)
        touched = torch.arange(block_table.shape[1], device=total.device) < pages_used[:, None]  # (B, max_blocks)
        bad = (touched & ((block_table < 0) | (block_table >= num_blocks))).nonzero()
        if bad.numel():
            b, blk = (int(x) for x in bad[0])
            raise err(
                f"block_table[{b}, {blk}] = {int(block_table[b, blk])} is out of range: sequence {b} uses "
                f"pages 0..{int(pages_used[b]) - 1} of its row, each must be in [0, {num_blocks})"
            )
    if cache_batch_idx is not None:
        idx = cache_batch_idx.tolist()
        bad = [i for i, x in enumerate(idx) if not 0 <= x < k_cache.shape[0]]
        if bad:
            raise err(
                f"cache_batch_idx[{bad[0]}] = {idx[bad[0]]} is out of range for a cache of {k_cache.shape[0]} sequences"
            )


# ------------------------------------------------------------------------------------------------
# memory: storage bounds, aliasing and in-place rules (the C++ ops' csrc/checks.h rules, for the Triton ops and the
# reference; concrete tensors only: fake and functional tensors, while torch.compile traces, have no memory to test)
# ------------------------------------------------------------------------------------------------
def is_concrete(*ts) -> bool:
    """True for plain tensors holding values (not fake / functional tensors while torch.compile traces); None
    entries are ignored."""
    return not torch.compiler.is_compiling() and all(t is None or type(t) is torch.Tensor for t in ts)


def check_storage(name: str, t: torch.Tensor, err: Err = RuntimeError) -> None:
    """t's view (storage offset and strides included) lies inside its storage (every tensor check of this module
    ends with it, before anything reads the tensor). A freed storage
    (``t.untyped_storage().resize_(0)``) holds 0 bytes: a kernel given its pointer would read memory the tensor
    does not own. The rule of torch's set_ / as_strided (and of the C++ ops' check_storage). Concrete tensors
    only (skipped otherwise)."""
    if not is_concrete(t) or t.layout != torch.strided:
        return
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    need = (t.storage_offset() + extent) * t.element_size() if t.numel() else 0
    try:
        have = t.untyped_storage().nbytes()
    except NotImplementedError:  # a torch.func wrapper has no storage of its own; the op's C++ check sees the real one
        return
    if need > have:
        raise err(
            f"{name} of sizes {list(t.shape)}, strides {list(t.stride())} and storage offset {t.storage_offset()} "
            f"needs a storage of {need} bytes, but its storage holds {have} bytes (was it freed or resized, e.g. by "
            f"untyped_storage().resize_(0)?)"
        )


def _memory_err(err: Err) -> Err:
    """Memory errors (a view outside its storage) are RuntimeErrors, as torch's own (SDPA raises one for a freed
    storage): the public functions' ValueError becomes a RuntimeError; an op's own error class stays."""
    return RuntimeError if err is ValueError else err


_CLONE = ". Please clone() the tensor before performing the operation."
_INFERENCE = (
    "Inplace update to inference tensor outside InferenceMode is not allowed. You can make a clone to get a "
    "normal tensor before doing inplace update. See https://github.com/pytorch/rfcs/pull/17 for more details."
)


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """The first and one-past-the-last byte a non-empty view can touch."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _dense(t: torch.Tensor) -> bool:
    """ATen's is_non_overlapping_and_dense: some permutation of t's dims is contiguous (size-1 dims aside)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """ATen's get_overlap_status(a, b) is Full or Partial (TooHard, for views that are not non-overlapping and
    dense, counts as no overlap there, as in torch's assert_no_overlap)."""
    if a is b:
        return True
    if a.numel() == 0 or b.numel() == 0:
        return False
    if not (_dense(a) and _dense(b)) or not _same_storage(a, b):
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def check_append(k_cache, v_cache, k_new, v_new, err: Err = RuntimeError) -> None:
    """The rules of torch's in-place writes for decode's append of k_new / v_new into k_cache / v_cache (those of
    the C++ op, csrc/checks.h check_append_aliasing): no cache with internal overlap (expand()ed over kv heads or
    sequences), no caches sharing memory (k_cache is v_cache), no k_new / v_new whose bytes fall within a cache's
    (a view into it), and no inference tensor written outside torch.inference_mode(). Concrete tensors only."""
    if k_new is None or not is_concrete(k_cache, v_cache, k_new, v_new):
        return
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise err(f"{name}: {_INFERENCE}")
        if torch._debug_has_internal_overlap(t) == 1:  # MemOverlap::Yes
            raise err(
                f"unsupported operation: more than one element of the written-to tensor {name} refers to a single "
                f"memory location (an expand()ed cache?){_CLONE}"
            )
    if _overlaps(k_cache, v_cache):
        raise err(
            f"unsupported operation: k_cache and v_cache, both written to, refer to the same memory locations{_CLONE}"
        )
    for in_name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.numel() == 0:
            continue
        lo, hi = _byte_span(t)
        for c_name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            shared = c.numel() > 0 and _same_storage(c, t) and lo < _byte_span(c)[1] and _byte_span(c)[0] < hi
            if shared or _overlaps(c, t):
                raise err(
                    f"unsupported operation: some elements of the input tensor {in_name} and the written-to tensor "
                    f"{c_name} refer to a single memory location{_CLONE}"
                )


def check_merge(out_a, lse_a, out_b, lse_b, err: Err = ValueError) -> None:
    """out_a, out_b (B, L, H, D) of one dtype and device; lse_a, lse_b (B, H, L) float32 beside them."""
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        check_float_tensor(name, t, 4, "(B, L, H, D)", err)
    if out_b.shape != out_a.shape or out_b.dtype != out_a.dtype or out_b.device != out_a.device:
        raise err(
            f"out_b must match out_a in shape, dtype and device: out_a {out_a.dtype} {tuple(out_a.shape)} on "
            f"{out_a.device}, out_b {out_b.dtype} {tuple(out_b.shape)} on {out_b.device}"
        )
    B, L, H, _ = out_a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (B, H, L):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise err(f"{name} must be a float32 tensor of shape (B, H, L) = {(B, H, L)}, got {got}")
        if t.device != out_a.device:
            raise err(f"{name} must be on out_a's device {out_a.device}, got {t.device}")
        check_storage(name, t, _memory_err(err))
