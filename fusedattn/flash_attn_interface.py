"""flash-attn 2.x's Python interface on fusedattn's kernels (every backend).

Model code (``from flash_attn import flash_attn_func``) and context-parallel engines (ring-flash-attn, yunchang:
``from flash_attn.flash_attn_interface import _flash_attn_forward, _flash_attn_backward``) call these functions;
here they keep flash-attn's signatures, layouts and return values and run on ``fusedattn.attention`` /
``varlen_attention`` / ``decode_attention`` and ``torch.ops.fusedattn.attention_backward``, i.e. on the backend
fusedattn/dispatch.py resolves (a keyword-only ``backend=``, default: the one ``install()`` was given, else "auto").

Emulated: flash-attn ``FLASH_ATTN_VERSION`` (2.6.3 and later share these signatures: separate
``window_size_left`` / ``window_size_right`` in the private functions, 4-tuples from the private forwards).
ring-flash-attn 0.1.8 reads the signatures through ``inspect`` and accepts both the 2.6.3+ and the older forms;
yunchang 0.6.4 compares ``flash_attn.__version__`` with "2.6.3" and calls the 2.6.3+ form.

Semantics (flash-attn's): q (B, Lq, Hq, D), k / v (B, Lk, Hkv, D); varlen (total, H, D) with int32 cu_seqlens;
causal is bottom-right aligned; window (left, right), -1 unbounded; softcap > 0 caps the scores;
softmax_lse is float32 natural-log, (B, Hq, Lq) (varlen: (Hq, total_q)); a row that sees no key gives 0.
Outputs are contiguous (B, L, H, D).

Not supported, raising NotImplementedError that names the argument (never a silently different result):
``dropout_p > 0``, ``alibi_slopes``, ``return_attn_probs=True`` / ``return_softmax=True`` (use
``_flash_attn_forward`` or ``flash_attn_with_kvcache(..., return_softmax_lse=True)`` for the lse),
``block_table``,
``leftpad_k`` and ``seqused_k`` in the varlen functions, ``rng_state`` in the private backwards (it only
replays dropout). ``deterministic`` is accepted and ignored: fusedattn has one backward per backend, whatever
its own reduction order is. ``zero_tensors`` is accepted (flash-attn's own kernels ignore it too).

``install()`` (opt-in; nothing is patched on import) puts this module in ``sys.modules`` as ``flash_attn`` and
``flash_attn.flash_attn_interface`` so third-party packages import it, and logs + warns once that it did;
``uninstall()`` restores what was there.
"""

from __future__ import annotations

import logging
import sys
import types
import warnings
from typing import Optional, Tuple, Union

import torch

from . import checks, dispatch
from .api import attention
from .backward import attention_backward as _attention_backward_op
from .backward import varlen_attention_backward as _varlen_backward_op
from .decode import decode_attention
from .varlen import varlen_attention

__all__ = [
    "FLASH_ATTN_VERSION",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "install",
    "uninstall",
    "installed",
]

FLASH_ATTN_VERSION = "2.8.3"  # the flash-attn release whose interface this module follows
__version__ = FLASH_ATTN_VERSION

log = logging.getLogger("fusedattn")

_DEFAULT_BACKEND = "auto"  # what backend=None means; install(backend=...) sets it


def _backend(backend: Optional[str]) -> str:
    return _DEFAULT_BACKEND if backend is None else backend


# ------------------------------------------------------------------------------------------------
# what we do not have: raise, naming the argument
# ------------------------------------------------------------------------------------------------
def _unsupported(fn: str, **args) -> None:
    """NotImplementedError for the first argument that asks for something fusedattn does not compute."""
    reasons = {
        "dropout_p": lambda x: x is not None and float(x) > 0.0,
        "alibi_slopes": lambda x: x is not None,
        "return_attn_probs": bool,
        "return_softmax": bool,
        "block_table": lambda x: x is not None,
        "leftpad_k": lambda x: x is not None,
        "seqused_k": lambda x: x is not None,
        "rng_state": lambda x: x is not None,
    }
    why = {
        "dropout_p": "the fused kernels have no dropout (pass dropout_p=0.0)",
        "alibi_slopes": "the fused kernels have no ALiBi bias",
        "return_attn_probs": "the fused kernels never materialize the probabilities (the lse is available from "
        "_flash_attn_forward / _flash_attn_varlen_forward)",
        "return_softmax": "the fused kernels never materialize the probabilities",
        "block_table": "paged K/V is supported by flash_attn_with_kvcache only",
        "leftpad_k": "left-padded keys are not supported",
        "seqused_k": "seqused_k is not supported (pass the real lengths in cu_seqlens_k)",
        "rng_state": "rng_state only replays dropout, which the fused kernels do not have",
    }
    for name, value in args.items():
        if reasons[name](value):
            raise NotImplementedError(f"fusedattn {fn}: {name}={_short(value)} is not supported: {why[name]}")


def _short(x) -> str:
    return f"<tensor {tuple(x.shape)}>" if isinstance(x, torch.Tensor) else repr(x)


def _window(window_size) -> Tuple[int, int]:
    if window_size is None:
        return (-1, -1)
    return checks.check_window(tuple(window_size))


def _softcap(softcap) -> float:
    return 0.0 if softcap is None else float(softcap)  # yunchang passes softcap=None for "off"


def _bhld(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _check_4d(**tensors) -> None:
    for name, t in tensors.items():
        checks.check_float_tensor(name, t, 4, "(B, L, H, D)")


# ------------------------------------------------------------------------------------------------
# public functions (flash_attn.flash_attn_interface's)
# ------------------------------------------------------------------------------------------------
def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    backend: Optional[str] = None,
):
    """flash-attn's ``flash_attn_func``: q (B, Lq, Hq, D), k / v (B, Lk, Hkv, D|Dv) -> out (B, Lq, Hq, Dv).
    Differentiable in q, k, v. See the module docstring for what raises."""
    _unsupported("flash_attn_func", dropout_p=dropout_p, alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs)
    _check_4d(q=q, k=k, v=v)
    out = attention(
        _bhld(q),
        _bhld(k),
        _bhld(v),
        causal=bool(causal),
        scale=softmax_scale,
        window=_window(window_size),
        softcap=_softcap(softcap),
        backend=_backend(backend),
    )
    return _bhld(out).contiguous()  # (B, Lq, Hq, Dv), as flash-attn returns it


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    backend: Optional[str] = None,
):
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv (B, L, 3, H, D) -> out (B, L, H, D)."""
    checks.check_float_tensor("qkv", qkv, 5, "(B, L, 3, H, D)")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, L, 3, H, D), got shape {tuple(qkv.shape)}")
    return flash_attn_func(
        qkv[:, :, 0],
        qkv[:, :, 1],
        qkv[:, :, 2],
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        backend=backend,
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    backend: Optional[str] = None,
):
    """flash-attn's ``flash_attn_kvpacked_func``: q (B, Lq, Hq, D), kv (B, Lk, 2, Hkv, D) -> out (B, Lq, Hq, D)."""
    checks.check_float_tensor("kv", kv, 5, "(B, Lk, 2, Hkv, D)")
    if kv.shape[2] != 2:
        raise ValueError(f"kv must be (B, Lk, 2, Hkv, D), got shape {tuple(kv.shape)}")
    return flash_attn_func(
        q,
        kv[:, :, 0],
        kv[:, :, 1],
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        backend=backend,
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    *,
    backend: Optional[str] = None,
):
    """flash-attn's ``flash_attn_varlen_func``: q (total_q, Hq, D), k / v (total_k, Hkv, D|Dv), cu_seqlens (B+1,)
    int32 -> out (total_q, Hq, Dv). Differentiable in q, k, v."""
    _unsupported(
        "flash_attn_varlen_func",
        dropout_p=dropout_p,
        alibi_slopes=alibi_slopes,
        return_attn_probs=return_attn_probs,
        block_table=block_table,
    )
    return varlen_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal=bool(causal),
        scale=softmax_scale,
        window=_window(window_size),
        softcap=_softcap(softcap),
        backend=_backend(backend),
    )


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    backend: Optional[str] = None,
):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, H, D) -> out (total, H, D)."""
    checks.check_float_tensor("qkv", qkv, 4, "(total, 3, H, D)")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (total, 3, H, D), got shape {tuple(qkv.shape)}")
    return flash_attn_varlen_func(
        qkv[:, 0],
        qkv[:, 1],
        qkv[:, 2],
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        backend=backend,
    )


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    backend: Optional[str] = None,
):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (total_q, Hq, D), kv (total_k, 2, Hkv, D)."""
    checks.check_float_tensor("kv", kv, 4, "(total_k, 2, Hkv, D)")
    if kv.shape[1] != 2:
        raise ValueError(f"kv must be (total_k, 2, Hkv, D), got shape {tuple(kv.shape)}")
    return flash_attn_varlen_func(
        q,
        kv[:, 0],
        kv[:, 1],
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        backend=backend,
    )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
    *,
    backend: Optional[str] = None,
):
    """flash-attn's ``flash_attn_with_kvcache`` on ``fusedattn.decode_attention``: q (B, Lq, Hq, D), caches
    (B_cache, L_max, Hkv, D) or paged (num_blocks, PAGE_SIZE, Hkv, D) with ``block_table`` (any PAGE_SIZE),
    k / v (B, Lnew, Hkv, D) appended **in place** at ``cache_seqlens`` before attending. ``cache_seqlens``: int
    or (B,) int32; None means every sequence fills the cache (not allowed with k / v). Returns out
    (B, Lq, Hq, Dv), and softmax_lse (B, Hq, Lq) float32 with ``return_softmax_lse``. ``rotary_cos`` /
    ``rotary_sin`` (seqlen_ro, rotary_dim / 2) rotate q and k before the append (k at cache_seqlens + i; q
    likewise when causal or local, else at cache_seqlens), GPT-J pairs unless ``rotary_interleaved=False``. No
    backward (as flash-attn's). ``cache_leftpad`` (B,) int32: sequence b's keys start there (contiguous caches)."""
    _unsupported("flash_attn_with_kvcache", alibi_slopes=alibi_slopes)
    checks.check_float_tensor("q", q, 4, "(B, Lq, Hq, D)")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when k and v are appended (where would they go?)")
        checks.check_float_tensor("k_cache", k_cache, 4, "(B_cache, L_max, Hkv, D)")
        full = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
        cache_seqlens = full
    return decode_attention(
        q,
        k_cache,
        v_cache,
        cache_seqlens=cache_seqlens,
        k_new=k,
        v_new=v,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        causal=bool(causal),
        scale=softmax_scale,
        window=_window(window_size),
        softcap=_softcap(softcap),
        num_splits=num_splits,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        rotary_interleaved=bool(rotary_interleaved),
        return_lse=bool(return_softmax_lse),
        backend=_backend(backend),
    )


# ------------------------------------------------------------------------------------------------
# private functions (what ring-flash-attn / yunchang call), flash-attn >= 2.6.3 signatures
# ------------------------------------------------------------------------------------------------
def _empty_extras(q: torch.Tensor):
    # flash-attn's S_dmask (empty unless return_softmax) and rng_state (dropout's seed and offset: none here)
    return q.new_empty((0,)), torch.zeros((2,), dtype=torch.int64, device=q.device)


def _softmax_d(dout: torch.Tensor, out: torch.Tensor, rows_last) -> torch.Tensor:
    """flash-attn's backward returns D = rowsum(dout * out) (float32), the one quantity the backward adds."""
    return rows_last((dout.float() * out.float()).sum(-1))


def _flash_attn_forward(
    q,
    k,
    v,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    return_softmax,
    *,
    backend: Optional[str] = None,
):
    """-> (out (B, Lq, Hq, Dv), softmax_lse (B, Hq, Lq) float32, S_dmask (empty), rng_state (2,) int64).
    Not differentiable (flash-attn's caller wraps it in an autograd.Function with _flash_attn_backward)."""
    _unsupported("_flash_attn_forward", dropout_p=dropout_p, alibi_slopes=alibi_slopes, return_softmax=return_softmax)
    _check_4d(q=q, k=k, v=v)
    with torch.no_grad():
        out, lse = attention(
            _bhld(q),
            _bhld(k),
            _bhld(v),
            causal=bool(causal),
            scale=softmax_scale,
            window=_window((window_size_left, window_size_right)),
            softcap=_softcap(softcap),
            return_lse=True,
            backend=_backend(backend),
        )
    return (_bhld(out).contiguous(), lse, *_empty_extras(q))


def _flash_attn_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
    *,
    backend: Optional[str] = None,
):
    """Writes the gradients of one block into dq, dk, dv ((B, L, H, D); allocated when None) using the caller's
    ``out`` and ``softmax_lse`` (e.g. a ring's global ones); returns softmax_d = rowsum(dout * out), (B, Hq, Lq)
    float32 (flash-attn pads its last dimension to a multiple of 128; nothing reads it)."""
    _unsupported("_flash_attn_backward", dropout_p=dropout_p, alibi_slopes=alibi_slopes, rng_state=rng_state)
    _check_4d(dout=dout, q=q, k=k, v=v, out=out)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    left, right = _window((window_size_left, window_size_right))
    _attention_backward_op(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        checks.default_scale(softmax_scale, q.shape[-1]),
        left,
        0 if causal else right,
        True,
        _softcap(softcap),
        "blhd",
        _backend(backend),
    )
    return _softmax_d(dout, out, lambda d: d.transpose(1, 2))


def _flash_attn_varlen_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
    leftpad_k=None,
    seqused_k=None,
    zero_tensors=False,
    num_splits=0,
    *,
    backend: Optional[str] = None,
):
    """-> (out (total_q, Hq, Dv), softmax_lse (Hq, total_q) float32, S_dmask (empty), rng_state (2,) int64).
    ``num_splits`` is a performance hint (ignored)."""
    _unsupported(
        "_flash_attn_varlen_forward",
        dropout_p=dropout_p,
        alibi_slopes=alibi_slopes,
        return_softmax=return_softmax,
        block_table=block_table,
        leftpad_k=leftpad_k,
        seqused_k=seqused_k,
    )
    with torch.no_grad():
        out, lse = varlen_attention(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            causal=bool(causal),
            scale=softmax_scale,
            window=_window((window_size_left, window_size_right)),
            softcap=_softcap(softcap),
            return_lse=True,
            backend=_backend(backend),
        )
    return (out, lse, *_empty_extras(q))


def _flash_attn_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
    zero_tensors=False,
    *,
    backend: Optional[str] = None,
):
    """Writes one packed block's gradients into dq, dk, dv ((total, H, D); allocated when None) with the
    caller's ``out`` and ``softmax_lse`` (Hq, total_q); returns softmax_d = rowsum(dout * out), (Hq, total_q)."""
    _unsupported("_flash_attn_varlen_backward", dropout_p=dropout_p, alibi_slopes=alibi_slopes, rng_state=rng_state)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    left, right = _window((window_size_left, window_size_right))
    _varlen_backward_op(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        checks.default_scale(softmax_scale, q.shape[-1]),
        left,
        0 if causal else right,
        _softcap(softcap),
        _backend(backend),
    )
    return _softmax_d(dout, out, lambda d: d.transpose(0, 1))


# ------------------------------------------------------------------------------------------------
# install(): `import flash_attn` resolves to this module (opt-in)
# ------------------------------------------------------------------------------------------------
_PUBLIC = (  # what `flash_attn` itself exports
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
)
_MODULE_NAMES = ("flash_attn", "flash_attn.flash_attn_interface")
_saved: Optional[dict] = None  # sys.modules entries install() replaced (None: not installed)


def _package() -> types.ModuleType:
    """A ``flash_attn`` package whose top level exports what flash-attn's does."""
    pkg = types.ModuleType("flash_attn", "fusedattn's flash-attn interface (fusedattn.flash_attn_interface.install())")
    pkg.__version__ = FLASH_ATTN_VERSION
    pkg.__path__ = []  # a package: `import flash_attn.flash_attn_interface` finds the submodule in sys.modules
    pkg.flash_attn_interface = sys.modules[__name__]
    pkg.__fusedattn__ = True
    for name in _PUBLIC:
        setattr(pkg, name, globals()[name])
    return pkg


def install(backend: str = "auto") -> None:
    """Make ``import flash_attn`` and ``import flash_attn.flash_attn_interface`` resolve to this module for every
    importer from now on (third-party packages included), with ``flash_attn.__version__`` =
    FLASH_ATTN_VERSION; functions called without ``backend=`` then use ``backend``. Logs and warns once. A package
    that already imported the real flash-attn keeps it. Undo with ``uninstall()``."""
    global _saved, _DEFAULT_BACKEND
    if backend not in dispatch.CHOICES:
        raise ValueError(f"backend must be one of {', '.join(dispatch.CHOICES)}, got {backend!r}")
    _DEFAULT_BACKEND = backend
    if _saved is not None:
        return
    _saved = {name: sys.modules.get(name) for name in _MODULE_NAMES}
    sys.modules["flash_attn"] = _package()
    sys.modules["flash_attn.flash_attn_interface"] = sys.modules[__name__]
    msg = (
        f"fusedattn: `import flash_attn` now resolves to fusedattn.flash_attn_interface (flash-attn "
        f"{FLASH_ATTN_VERSION} interface on fusedattn's kernels, backend {backend!r})"
    )
    log.info(msg)
    warnings.warn(msg, UserWarning, stacklevel=2)


def uninstall() -> None:
    """Undo ``install()``: restore the sys.modules entries it replaced (the real flash-attn, or nothing)."""
    global _saved, _DEFAULT_BACKEND
    if _saved is None:
        return
    for name, mod in _saved.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod
    _saved = None
    _DEFAULT_BACKEND = "auto"


def installed() -> bool:
    """Whether ``install()`` is in effect."""
    return _saved is not None
