"""Backend dispatch as data: which kernel serves which call.

Backends (``BACKENDS``): ``"cpu"`` (C++ kernels in fusedattn._C), ``"triton"`` (kernels/, GPU tensors, or CPU
tensors under ``TRITON_INTERPRET=1``), ``"cuda"`` (csrc/cuda) and ``"reference"`` (plain PyTorch,
fusedattn/reference.py). A public function's ``backend=`` also takes ``"auto"``.

``TABLE[family][backend]`` is an ``Entry``: the op to call and the rule naming the cases its kernel does not
cover. Every entry of a family takes the same arguments (the family's signature, below), so a public function
calls ``resolve(...).op(...)`` and never compares backend names. ``resolve(family, requested, case)`` is the one
chain: an explicit backend runs the case or raises a RuntimeError naming why; ``"auto"`` takes the first entry of
``DEVICE_PREFERENCE[device type]`` that covers the case, else the family's fallback (the reference; torch's own
SDPA for the drop-in) with a UserWarning naming every reason -- visibly, never silently.

Families and their op signatures (the C++ schemas, csrc/torch_bindings.cpp):
  attention  (q, k, v, attn_mask, scale, window_left, window_right, bottom_right, softcap) -> (out, lse)
  sdpa       torch's: (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> out
  varlen     (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
              bottom_right, softcap) -> (out, lse)
  decode     (q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx, scale, window_left,
              window_right, softcap, num_splits) -> (out, lse)
  merge      (out_a, lse_a, out_b, lse_b) -> (out, lse)

Availability (extension loaded, CUDA present, Triton importable) is probed once, at import, into plain dicts, so
torch.compile traces ``resolve`` without graph breaks. Adding a backend: its probe in ``_PROBES`` (which also makes
it one of ``BACKENDS``), its entries in ``_SPEC`` (op + rule per family; ``TABLE`` is built from it), its place in
``DEVICE_PREFERENCE``, its kernel module, and one line in the test fixture (CONTRIBUTING.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from . import _ops
from .checks import default_scale
from .reference import attention_ref, decode_attention_ref, merge_attention_states_ref, varlen_attention_ref

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# "auto": the kernels tried, in order, for tensors on each device type. One choice for every family: the
# hand-written CUDA kernels first, Triton's for the cases they do not cover. NOT YET MEASURED (no GPU run has
# compared the two per family); the first GPU run decides, and changing it is this one line.
DEVICE_PREFERENCE: Dict[str, Tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

log = logging.getLogger("fusedattn")


# ------------------------------------------------------------------------------------------------
# the case a call presents
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """What the rules look at. Built by the public functions from their arguments (no tensor values read);
    any description will do for a test (``Case("cuda", torch.float32, 80, 80)`` needs no GPU)."""

    device: Union[torch.device, str]
    dtype: torch.dtype
    head_dim: int
    value_dim: int
    has_mask: bool = False
    softcap: float = 0.0
    cache_aligned: bool = True  # decode: every k/v cache row starts on a 16-byte boundary (the CUDA kernel's cp.async)
    dropout_p: float = 0.0  # drop-in only
    ndim: int = 4  # drop-in only: rank of the inputs (the fused kernels take 3-D or 4-D)
    mask_requires_grad: bool = False  # drop-in only

    @property
    def device_type(self) -> str:
        return self.device.type if isinstance(self.device, torch.device) else torch.device(self.device).type


# ------------------------------------------------------------------------------------------------
# availability: probed once, at import
# ------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    """Triton's interpreter runs the Triton kernels on CPU tensors (slowly): for tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _no_extension() -> Optional[str]:
    if _ops._C is None:
        return f"the compiled extension fusedattn._C did not load ({_ops._C_IMPORT_ERROR})"
    return None


def _probe_cuda() -> Optional[str]:
    if _no_extension() is not None:
        return _no_extension()
    if not _ops._BUILD_INFO.get("cuda", False):
        return f"fusedattn._C has no CUDA kernels ({_ops._BUILD_INFO.get('cuda_reason', 'unknown')})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def _probe_triton() -> Optional[str]:
    if not (torch.cuda.is_available() or _interpreting()):
        return "torch sees no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on the CPU, slowly)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    try:  # registers torch.ops.fusedattn.triton_attention_fwd/_bwd and triton_varlen_fwd/_bwd
        from fusedattn.kernels import attention  # noqa: F401
    except Exception as e:  # a broken triton install must not break `import fusedattn`
        return f"the Triton attention kernels failed to load ({type(e).__name__}: {e})"
    return None


def _probe_triton_decode() -> Optional[str]:
    """The Triton decode ops (triton_decode_fwd, triton_merge_attention_states) register when kernels/decode.py
    is imported: done here, once, so that torch.compile finds them registered before it traces a call."""
    try:
        from fusedattn.kernels import decode  # noqa: F401
    except Exception as e:  # a broken triton install must not break `import fusedattn`
        return f"the Triton decode kernels failed to load ({type(e).__name__}: {e})"
    return None


# backend -> its probe: None when it can run here, else why not
_PROBES: Dict[str, Callable[[], Optional[str]]] = {
    "cpu": _no_extension,
    "triton": _probe_triton,
    "cuda": _probe_cuda,
    "reference": lambda: None,
}
BACKENDS = tuple(_PROBES)  # the real backends (the test fixture's order)
CHOICES = ("auto",) + BACKENDS  # what a public function's backend= accepts
_INTERPRETING = _interpreting()
_REASONS: Dict[str, Optional[str]] = {name: _PROBES[name]() for name in BACKENDS}


def available_backends() -> Dict[str, Optional[str]]:
    """Map each backend name to None (available) or the reason it is not."""
    return dict(_REASONS)


# ------------------------------------------------------------------------------------------------
# coverage rules: Case -> None (covered) or the reason, naming the case
# ------------------------------------------------------------------------------------------------
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = (64, 128, 256)


def _dtypes(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def _fused_dtype(case: Case) -> Optional[str]:
    if case.dtype not in FUSED_DTYPES:
        return f"dtype {case.dtype} (the fused kernels support {_dtypes(FUSED_DTYPES)})"
    return None


def _on_cpu(case: Case) -> Optional[str]:
    return None if case.device_type == "cpu" else f"it needs CPU tensors, got {case.device}"


def _on_cuda(case: Case) -> Optional[str]:
    return None if case.device_type == "cuda" else f"it needs CUDA tensors, got {case.device}"


def _on_triton_device(case: Case) -> Optional[str]:
    if case.device_type == "cuda" or (_INTERPRETING and case.device_type == "cpu"):
        return None
    return f"it needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {case.device}"


def _cuda_kernels(case: Case) -> Optional[str]:
    """What the hand-written CUDA attention and decode kernels cover."""
    if case.dtype not in CUDA_DTYPES:
        return f"dtype {case.dtype} (the CUDA kernels take {_dtypes(CUDA_DTYPES)})"
    if case.head_dim not in CUDA_HEAD_DIMS:
        return f"head dim {case.head_dim} (the CUDA kernels are built for {', '.join(map(str, CUDA_HEAD_DIMS))})"
    if case.value_dim != case.head_dim:
        return f"value head dim {case.value_dim} != head dim {case.head_dim} (the CUDA kernels need them equal)"
    return None


def _cuda_attention(case: Case) -> Optional[str]:
    reason = _cuda_kernels(case)
    if reason is None and case.has_mask:
        return "an attn_mask (the CUDA kernels build causal and window masks only)"
    if reason is None and case.softcap > 0:
        return f"softcap={case.softcap} (the CUDA attention kernels have no softcap)"
    return reason


def _cuda_decode(case: Case) -> Optional[str]:
    reason = _cuda_kernels(case)
    if reason is None and not case.cache_aligned:
        # cp.async copies 16-byte rows of the cache in place (it is written to, so it cannot be copied)
        return "k_cache / v_cache rows are not 16-byte aligned"
    return reason


def _drop_in(case: Case) -> Optional[str]:
    """What every fused kernel lacks, for the drop-in (which then calls torch's SDPA)."""
    if case.dropout_p > 0.0:
        return f"dropout_p={case.dropout_p} (the fused kernels have no dropout)"
    if case.ndim not in (3, 4):
        return f"{case.ndim}-D inputs (the fused kernels take 3-D or 4-D)"
    if case.mask_requires_grad:
        return "attn_mask requires grad (the fused kernels give no mask gradient)"
    return None


def _all(*rules: Callable[[Case], Optional[str]]) -> Callable[[Case], Optional[str]]:
    """The first reason of `rules`, in order (None: every rule covers the case)."""

    def rule(case: Case) -> Optional[str]:
        for r in rules:
            reason = r(case)
            if reason is not None:
                return reason
        return None

    return rule


def _everything(case: Case) -> Optional[str]:
    return None


# ------------------------------------------------------------------------------------------------
# ops: each family's entries share its signature (adapters where an op's own differs)
# ------------------------------------------------------------------------------------------------
def _op(name: str):
    """torch.ops.fusedattn.<name>, looked up when the table is built (it exists once its backend loaded)."""
    return getattr(torch.ops.fusedattn, name)


def _attention_reference(q, k, v, attn_mask, scale, window_left, window_right, bottom_right, softcap):
    return attention_ref(
        q,
        k,
        v,
        attn_mask=attn_mask,
        causal_align="bottom_right" if bottom_right else "top_left",
        scale=scale,
        window=(window_left, window_right),
        softcap=softcap,
        return_lse=True,
    )


def _sdpa_via(attention_fwd):
    """torch's SDPA signature over an attention op (the arguments already checked by the drop-in)."""

    def sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        squeeze = query.dim() == 3  # (N, L, E): one head
        q, k, v = (t.unsqueeze(1) for t in (query, key, value)) if squeeze else (query, key, value)
        mask = attn_mask.unsqueeze(1) if squeeze and attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        out, _ = attention_fwd(q, k, v, mask, default_scale(scale, q.shape[-1]), -1, 0 if is_causal else -1, False, 0.0)
        return out.squeeze(1) if squeeze else out

    return sdpa


# The real torch function, captured so that the drop-in keeps working after a user does
# ``F.scaled_dot_product_attention = fusedattn.scaled_dot_product_attention``.
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


def _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return TORCH_SDPA(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


def _triton_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    window_left,
    window_right,
    bottom_right,
    softcap,
):
    # the Triton varlen op is always bottom-right aligned (varlen's only alignment): no bottom_right argument
    return torch.ops.fusedattn.triton_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap
    )


def _triton_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, wl, wr, bottom_right, softcap, g):
    # the Triton varlen op is always bottom-right aligned: no bottom_right argument
    return torch.ops.fusedattn.triton_varlen_bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, g
    )


def _backward_reference(name: str):
    """backward.py's float32 formula (imported when the table is built: backward.py imports this module)."""

    def factory():
        from . import backward

        return getattr(backward, name)

    return factory


def _varlen_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    window_left,
    window_right,
    bottom_right,
    softcap,
):
    return varlen_attention_ref(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale=scale,
        window=(window_left, window_right),
        softcap=softcap,
        return_lse=True,
    )


def _decode_reference(
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
):
    return decode_attention_ref(
        q,
        k_cache,
        v_cache,
        cache_seqlens=cache_seqlens,
        k_new=k_new,
        v_new=v_new,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
        causal=False,
        scale=scale,
        window=(window_left, window_right),
        softcap=softcap,
        return_lse=True,
    )


def _merge_reference(out_a, lse_a, out_b, lse_b):
    return merge_attention_states_ref(out_a, lse_a, out_b, lse_b)


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    family: str
    backend: str
    op: Optional[Callable]  # the family's signature; None when the backend did not load here
    rule: Callable[[Case], Optional[str]]  # None: the kernel covers the case, else why not


# family -> (backend -> (op factory, rule[, probe])); the op factory runs at import, only for an entry that loaded;
# the optional probe is for kernels that load separately from the rest of their backend.
# "cpu" and "cuda" share the C++ ops: torch's dispatcher picks the kernel from the tensors' device.
_CPU = _all(_on_cpu, _fused_dtype)
_CUDA = _all(_on_cuda, _fused_dtype)
_TRITON = _all(_on_triton_device, _fused_dtype)
_SPEC = {
    "attention": {
        "cpu": (lambda: _op("attention_fwd"), _CPU),
        "triton": (lambda: _op("triton_attention_fwd"), _TRITON),
        "cuda": (lambda: _op("attention_fwd"), _all(_CUDA, _cuda_attention)),
        "reference": (lambda: _attention_reference, _everything),
    },
    "sdpa": {  # the drop-in: falls back to torch's own function instead of the reference
        "cpu": (lambda: _sdpa_via(_op("attention_fwd")), _all(_drop_in, _CPU)),
        "triton": (lambda: _sdpa_via(_op("triton_attention_fwd")), _all(_drop_in, _TRITON)),
        "cuda": (lambda: _sdpa_via(_op("attention_fwd")), _all(_drop_in, _CUDA, _cuda_attention)),
        "torch": (lambda: _torch_sdpa, _everything),
    },
    "varlen": {  # no CUDA C++ varlen kernel: Triton serves CUDA tensors
        "cpu": (lambda: _op("varlen_fwd"), _CPU),
        "triton": (lambda: _triton_varlen, _TRITON),
        "reference": (lambda: _varlen_reference, _everything),
    },
    "decode": {
        "cpu": (lambda: _op("decode_fwd"), _CPU),
        "triton": (lambda: _op("triton_decode_fwd"), _TRITON, _probe_triton_decode),
        "cuda": (lambda: _op("decode_fwd"), _all(_CUDA, _cuda_decode)),
        "reference": (lambda: _decode_reference, _everything),
    },
    "merge": {  # the CUDA merge kernel takes every fused dtype
        "cpu": (lambda: _op("merge_attention_states"), _CPU),
        "triton": (lambda: _op("triton_merge_attention_states"), _TRITON, _probe_triton_decode),
        "cuda": (lambda: _op("merge_attention_states"), _CUDA),
        "reference": (lambda: _merge_reference, _everything),
    },
}
FAMILIES = tuple(_SPEC)  # ("attention", "sdpa", "varlen", "decode", "merge")
# The differentiable families: backend -> factory of the backward its forward pairs with (the same backend, so the
# same availability), one signature per family:
#   attention: bwd(dout, q, k, v, out, lse, attn_mask, scale, window_left, window_right, bottom_right, softcap,
#                  grad_lse) -> (dq, dk, dv), (B, H, L, D) tensors
#   varlen:    bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
#                  window_left, window_right, bottom_right, softcap, grad_lse) -> (dq, dk, dv), packed tensors
# The ops' autograd (fusedattn/_ops.py) pairs each forward op with its backward op by name; this table is what the
# callers that run a backward on their own (fusedattn/backward.py's ops, the ring in distributed.py) read.
_BACKWARD_SPEC = {
    "attention": {
        "cpu": lambda: _op("attention_bwd"),
        "triton": lambda: _op("triton_attention_bwd"),
        "cuda": lambda: _op("attention_bwd"),
        "reference": _backward_reference("_dense_reference"),
    },
    "varlen": {
        "cpu": lambda: _op("varlen_bwd"),
        "triton": lambda: _triton_varlen_bwd,
        "reference": _backward_reference("_varlen_reference"),
    },
}
_BACKWARD_OPS: Dict[Tuple[str, str], Callable] = {}


def backward_op(family: str, backend: str) -> Callable:
    """The backward of ``resolve(family, ...)``'s entry ``backend`` (see _BACKWARD_SPEC for the signatures)."""
    if family not in _BACKWARD_SPEC:
        raise ValueError(f"family must be one of {tuple(_BACKWARD_SPEC)} (the differentiable ones), got {family!r}")
    factory = _BACKWARD_SPEC[family].get(backend)
    reason = AVAILABILITY.get((family, backend), "not in the table")
    if factory is None or reason is not None:
        raise RuntimeError(f"fusedattn backend {backend!r} has no {family} backward here: {reason or 'none written'}")
    if (family, backend) not in _BACKWARD_OPS:
        _BACKWARD_OPS[(family, backend)] = factory()
    return _BACKWARD_OPS[(family, backend)]


FALLBACK = {
    "attention": "reference",
    "sdpa": "torch",
    "varlen": "reference",
    "decode": "reference",
    "merge": "reference",
}
_FALLBACK_TARGET = {
    "reference": "the reference implementation",
    "torch": "torch.nn.functional.scaled_dot_product_attention",
}


def _availability(name: str, spec: tuple, probed: Dict[Callable, Optional[str]]) -> Optional[str]:
    """The backend's reason, else that of the entry's own probe (a third spec item: kernels loaded separately)."""
    reason = _REASONS.get(name)  # "torch" (the drop-in's fallback) is always there
    if reason is None and len(spec) > 2:
        if spec[2] not in probed:
            probed[spec[2]] = spec[2]()
        reason = probed[spec[2]]
    return reason


_PROBED: Dict[Callable, Optional[str]] = {}
# (family, backend) -> None (loaded) or why not: what resolve() reads (a test may monkeypatch it).
AVAILABILITY: Dict[Tuple[str, str], Optional[str]] = {
    (family, name): _availability(name, entry, _PROBED)
    for family, spec in _SPEC.items()
    for name, entry in spec.items()
}
TABLE: Dict[str, Dict[str, Entry]] = {
    family: {
        name: Entry(family, name, entry[0]() if AVAILABILITY[(family, name)] is None else None, entry[1])
        for name, entry in spec.items()
    }
    for family, spec in _SPEC.items()
}


# ------------------------------------------------------------------------------------------------
# the resolver
# ------------------------------------------------------------------------------------------------
def _why_not(family: str, backend: str, case: Case) -> Optional[Tuple[str, str]]:
    """None when `backend` runs `case` here, else (what, reason): what is "is unavailable" or "does not cover this
    case"."""
    entry = TABLE[family].get(backend)
    if entry is None:
        return "does not cover this case", f"it has no {family} kernel"
    reason = AVAILABILITY[(family, backend)]
    if reason is not None:
        return "is unavailable", reason
    reason = entry.rule(case)
    if reason is not None:
        return "does not cover this case", reason
    return None


def unsupported_reason(family: str, backend: str, case: Case) -> Optional[str]:
    """None when `backend` runs `case` for `family` here; otherwise the reason resolve() raises or warns with."""
    if family not in TABLE:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if backend not in BACKENDS and backend not in TABLE[family]:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    why = _why_not(family, backend, case)
    return None if why is None else why[1]


def warn_fallback(reason: str, *, target: str) -> None:
    """A visible fallback: a UserWarning (shown once per call site by Python's default filter) at the caller of
    the public function (warn_fallback <- resolve <- public function <- caller)."""
    msg = f"fusedattn: falling back to {target}: {reason}"
    log.debug(msg)
    warnings.warn(msg, UserWarning, stacklevel=4)


def resolve(family: str, requested: str, case: Case) -> Entry:
    """The entry (with the op to call) that runs `case`: `requested` itself, raising a RuntimeError that names
    why it cannot; or for "auto" the device preference, then the family's fallback with a UserWarning."""
    if requested not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {requested!r}")
    if requested != "auto":
        why = _why_not(family, requested, case)
        if why is not None:
            raise RuntimeError(f"fusedattn backend {requested!r} {why[0]}: {why[1]}")
        return TABLE[family][requested]
    candidates = DEVICE_PREFERENCE.get(case.device_type, ())
    reasons = []
    for name in candidates:
        why = _why_not(family, name, case)
        if why is None:
            return TABLE[family][name]
        reasons.append(f"{name}: {why[1]}")
    if not candidates:
        reasons.append(f"no fused kernel for device type {case.device_type!r}")
    fallback = FALLBACK[family]
    warn_fallback("; ".join(reasons), target=_FALLBACK_TARGET[fallback])
    return TABLE[family][fallback]
