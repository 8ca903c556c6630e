"""What the Triton kernel modules (attention.py, decode.py) share: constants, the exp2 idiom, the softcap, the
matmul helper (precision and the interpreter's upcast), ``pow2`` and the op registration.

Interpreter vs GPU is decided here, once: ``INTERPRET`` (``TRITON_INTERPRET=1``) switches the op registration
(``register_op``), the launcher (``launch``) and, inside kernels, ``mma``'s upcast. Kernel code has no other
interpreter branch.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# exp(x) = exp2(x * log2(e)): exp2 is the native instruction. log2(e) multiplies the *shifted* score (s - max),
# not the raw one: scores and row max stay in natural units, so s - max is exact when s is the max (a row with one
# dominant key, e.g. masked by -1e4, gets P = 1 exactly) and lse = max + log(l) round-trips bit for bit into the
# backward, where P = exp2((s - lse) * log2(e)). Folding log2(e) into the scale instead loses ~ulp(|lse| * 1.44)
# in P once |scores| is large (1e-3 relative at 1e4: the fp32 gradient rule fails).
LOG2E = tl.constexpr(1.4426950408889634)  # tl.constexpr: compiled kernels read only constexpr globals
LN2 = tl.constexpr(0.6931471805599453)
# The interpreter multiplies bf16/fp16 bit patterns as integers in tl.dot: mma computes in float32 there.
_UPCAST = tl.constexpr(INTERPRET)


@triton.jit
def exp_via_exp2(x):
    """e^x in natural units through exp2 (x is a shifted score, s - max or s - lse: see LOG2E)."""
    return tl.math.exp2(x * LOG2E)


@triton.jit
def log_via_log2(x):
    """Natural log through log2."""
    return tl.math.log2(x) * LN2


@triton.jit
def softcap_scores(qk, scale, softcap, SOFTCAP: tl.constexpr):
    """(s, t): scores in natural units, s = softcap * tanh(qk * scale / softcap) when SOFTCAP else qk * scale, and
    t = tanh(qk * scale / softcap) for the softcap's derivative in the backward (unused without SOFTCAP)."""
    if SOFTCAP:
        # tanh from exp2 (no libdevice, so the interpreter runs the same code); exp2(-2|x| log2 e) cannot overflow
        x = qk * (scale / softcap)
        e = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        s = t * softcap
    else:
        t = qk
        s = qk * scale
    return s, t


@triton.jit
def mma(a, b, acc):
    """a @ b + acc (acc: float32 tile, or None), float32 accumulation. a is rounded to b's dtype first: P and dS
    meet V, dO, Q, K in the input dtype, as in FlashAttention (a no-op for q @ k^T). Float32 operands use
    input_precision="ieee": exact fp32 products, no tf32."""
    if _UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong (see _UPCAST): float32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    else:
        a = a.to(b.dtype)
    if b.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def pow2(n: int) -> int:
    """Block size for a dimension of n: a power of two >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


if INTERPRET:

    def launch(kernel):
        return kernel
else:
    # wrap_triton lets torch.compile trace into the kernel launch
    from torch.library import wrap_triton as launch


def register_op(name: str, impl: Callable, fake: Optional[Callable] = None, mutates_args: Sequence[str] = ()):
    """Registers ``impl`` (a Python launcher of Triton kernels) as the op ``fusedattn::<name>``.

    On a GPU the op *is* the launcher: ``torch.library.triton_op`` wraps it (launches go through ``launch`` =
    ``wrap_triton``), so torch.compile sees the kernels themselves, and derives the fake impl by running the
    launcher on fake tensors (so ``fake`` is not used there). Under the interpreter triton_op does not survive
    torch.compile: the launcher becomes an opaque ``torch.library.custom_op`` with ``fake`` as its fake impl
    (``fake=None``: the caller registers it, as fusedattn._ops.register_attention_pair does)."""
    if INTERPRET:
        op = torch.library.custom_op(f"fusedattn::{name}", impl, mutates_args=tuple(mutates_args))
        if fake is not None:
            op.register_fake(fake)
        return op
    return torch.library.triton_op(f"fusedattn::{name}", impl, mutates_args=tuple(mutates_args))


__all__ = [
    "INTERPRET",
    "LN2",
    "LOG2E",
    "exp_via_exp2",
    "launch",
    "log_via_log2",
    "mma",
    "pow2",
    "register_op",
    "softcap_scores",
]
