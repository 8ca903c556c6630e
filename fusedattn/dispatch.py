"""Backend choice, in one place.

Backends: ``"cpu"`` (C++ kernels in fusedattn._C), ``"triton"`` and ``"cuda"`` (GPU kernels),
``"reference"`` (plain PyTorch, fusedattn/reference.py). ``"auto"`` picks the fused kernel for
the tensors' device; when none exists it falls back to the reference **visibly** (a warning that
names the reason), never silently.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

from . import _ops

BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

log = logging.getLogger("fusedattn")


def _interpreting() -> bool:
    """Triton's interpreter runs the Triton kernels on CPU tensors (slowly): for tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _probe(name: str) -> str | None:
    """None when backend `name` can run here, else why not (evaluated once, at import)."""
    if name == "reference":
        return None
    if name == "cpu":
        if _ops._C is None:
            return f"the compiled extension fusedattn._C did not load ({_ops._C_IMPORT_ERROR})"
        return None
    if name == "cuda":
        if _ops._C is None:
            return f"the compiled extension fusedattn._C did not load ({_ops._C_IMPORT_ERROR})"
        if not _ops._BUILD_INFO.get("cuda", False):
            return f"fusedattn._C has no CUDA kernels ({_ops._BUILD_INFO.get('cuda_reason', 'unknown')})"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None
    if name == "triton":
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
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


# Fixed for the life of the process; a plain dict so torch.compile can trace lookups into it.
_INTERPRETING = _interpreting()
_REASONS: dict[str, str | None] = {name: _probe(name) for name in BACKENDS if name != "auto"}


def _unavailable_reason(name: str) -> str | None:
    if name not in _REASONS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return _REASONS[name]


# What the hand-written CUDA kernels (csrc/cuda) cover; other cases go to another backend.
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = (64, 128, 256)


def cuda_unsupported_reason(dtype: torch.dtype, head_dim: int, value_dim: int, has_mask: bool = False,
                            softcap: float = 0.0) -> str | None:
    """None when the CUDA attention kernels cover this case, else why not (names the case)."""
    if dtype not in CUDA_DTYPES:
        return f"dtype {dtype} (the CUDA kernels take {', '.join(str(d) for d in CUDA_DTYPES)})"
    if head_dim not in CUDA_HEAD_DIMS:
        return f"head dim {head_dim} (the CUDA kernels are built for {', '.join(map(str, CUDA_HEAD_DIMS))})"
    if value_dim != head_dim:
        return f"value head dim {value_dim} != head dim {head_dim} (the CUDA kernels need them equal)"
    if has_mask:
        return "an attn_mask (the CUDA kernels build causal and window masks only)"
    if softcap > 0:
        return f"softcap={softcap} (the CUDA attention kernels have no softcap)"
    return None


def available_backends() -> dict[str, str | None]:
    """Map each backend name to None (available) or the reason it is not."""
    return dict(_REASONS)


def warn_fallback(reason: str, *, target: str) -> None:
    """A visible fallback: a UserWarning (shown once per call site by Python's default filter)."""
    msg = f"fusedattn: falling back to {target}: {reason}"
    log.debug(msg)
    warnings.warn(msg, UserWarning, stacklevel=4)


def select_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``requested`` for tensors on ``device`` with ``dtype``; raises RuntimeError when an
    explicitly requested backend cannot run, warns when "auto" has to use the reference."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        reason = _unavailable_reason(requested)
        if reason is not None:
            raise RuntimeError(f"fusedattn backend {requested!r} is unavailable: {reason}")
        if requested == "cpu" and device.type != "cpu":
            raise RuntimeError(f"fusedattn backend 'cpu' needs CPU tensors, got {device}")
        if requested == "cuda" and device.type != "cuda":
            raise RuntimeError(f"fusedattn backend 'cuda' needs CUDA tensors, got {device}")
        if requested == "triton" and device.type != "cuda" and not (_INTERPRETING and device.type == "cpu"):
            raise RuntimeError(f"fusedattn backend 'triton' needs CUDA tensors (or CPU tensors with "
                               f"TRITON_INTERPRET=1), got {device}")
        if requested != "reference" and dtype not in FUSED_DTYPES:
            raise RuntimeError(f"fusedattn backend {requested!r} supports {FUSED_DTYPES}, got {dtype}")
        return requested
    candidates = ("cpu",) if device.type == "cpu" else ("cuda", "triton") if device.type == "cuda" else ()
    reasons = []
    if dtype not in FUSED_DTYPES:
        reasons.append(f"dtype {dtype} is not one of {FUSED_DTYPES}")
    else:
        for name in candidates:
            reason = _unavailable_reason(name)
            if reason is None:
                return name
            reasons.append(f"{name}: {reason}")
    if not candidates:
        reasons.append(f"no fused kernel for device type {device.type!r}")
    warn_fallback("; ".join(reasons), target="the reference implementation")
    return "reference"
