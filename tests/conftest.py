"""Shared test helpers: the backends every kernel test grid runs on (the `backend` fixture, `backend_cases`,
`device_for`, `skip_unsupported`, `raw_op`), the 2x tolerance rule, `grads`, a per-test seeded generator, tensor
builders and a pairwise case builder.

Nothing here imports fusedattn at import time (only inside the helpers, when a test calls them), so tests of the
pure-PyTorch reference run even when the extension is not built.
"""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import pytest
import torch

# Without a GPU, the "triton" cases of the test grids run the Triton kernels through Triton's interpreter
# (numpy, on the CPU; reduced grids). This has to be decided before triton is first imported (fusedattn imports
# it when the triton backend is usable); TRITON_INTERPRET=0 in the environment opts out.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


# --------------------------------------------------------------------------------------------------------------
# Backends. Every kernel test grid runs on each of them; a case a backend cannot run here is skipped with the
# reason fusedattn.dispatch gives. Adding a backend (besides its dispatch-table entry and its kernel module) is
# one line in BACKENDS.
# --------------------------------------------------------------------------------------------------------------

_GPU = torch.cuda.is_available()
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class Backend(NamedTuple):
    device: str  # where its test tensors live on this machine
    op_prefix: str | None  # its raw ops are torch.ops.fusedattn.<op_prefix><op>; None: it has none
    interpreted: bool = False  # GPU kernels run through Triton's interpreter on CPU tensors: reduced grids


_TRITON_DEVICE = "cuda" if _GPU and not _INTERPRET else "cpu"


BACKENDS: dict[str, Backend] = {
    "cpu": Backend("cpu", ""),
    "triton": Backend(_TRITON_DEVICE, "triton_", interpreted=_TRITON_DEVICE == "cpu"),
    "cuda": Backend("cuda", ""),  # torch's dispatch key picks the CUDA kernels of the shared ops
    "reference": Backend("cpu", None),
}


# The backends with fused kernels of their own (raw ops to opcheck, compile and call directly).
FUSED_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.op_prefix is not None)


def device_for(backend: str) -> str:
    """The device of `backend`'s test tensors here ("cpu" for triton without a GPU: TRITON_INTERPRET=1)."""
    return BACKENDS[backend].device


def interpreted(backend: str) -> bool:
    """True when `backend`'s GPU kernels run through Triton's interpreter on CPU tensors: such cases use the
    reduced grids (small shapes; the interpreter runs every block operation through numpy)."""
    return BACKENDS[backend].interpreted


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run here, else fusedattn.dispatch's reason."""
    from fusedattn import dispatch

    return dispatch.available_backends()[backend]


def _skip_message(backend: str, reason: str) -> str:
    return f"{backend} backend: {reason}"


def backend_param(backend: str, *values, id: str | None = None):
    """pytest.param(backend, *values), skipped (with the dispatcher's reason) where `backend` cannot run."""
    reason = unavailable_reason(backend)
    marks = [pytest.mark.skip(reason=_skip_message(backend, reason))] if reason is not None else []
    return pytest.param(backend, *values, id=id or backend, marks=marks)


def backend_params(names: Sequence[str] = tuple(BACKENDS)) -> list:
    """One param per backend (for `parametrize("backend", ...)` where a test takes a subset of the backends)."""
    return [backend_param(name) for name in names]


def backend_cases(cases: Sequence[dict], small_cases: Sequence[dict | None] = None) -> list:
    """(backend, case) params for `parametrize("backend,case", ...)`: every case on every backend, except that
    an interpreted backend runs `small_cases` (when given) instead."""
    params = []
    for name in BACKENDS:
        chosen = small_cases if small_cases is not None and interpreted(name) else cases
        params += [backend_param(name, c, id=f"{name}-{case_id(c)}") for c in chosen]
    return params


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    """Each kernel backend in turn; skipped (with the dispatcher's reason) where it cannot run."""
    reason = unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(_skip_message(request.param, reason))
    return request.param


def skip_unsupported(family: str, backend: str, **case) -> None:
    """Skip the running test when `backend` cannot serve this `family` ("attention", "varlen", "decode", "merge",
    "sdpa") case, with the dispatcher's reason. `case` holds fusedattn.dispatch.Case's fields (dtype, head_dim,
    value_dim, has_mask, softcap, ...); device defaults to device_for(backend)."""
    from fusedattn import dispatch

    case.setdefault("device", torch.device(device_for(backend)))
    case.setdefault("value_dim", case.get("head_dim"))
    reason = dispatch.unsupported_reason(family, backend, dispatch.Case(**case))
    if reason is not None:
        pytest.skip(_skip_message(backend, reason))


def raw_op(name: str, backend: str):
    """`backend`'s raw op torch.ops.fusedattn.<prefix><name> (e.g. "attention_fwd"); skips the running test for
    a backend without raw ops (the reference is plain PyTorch)."""
    prefix = BACKENDS[backend].op_prefix
    if prefix is None:
        pytest.skip(f"{backend} backend: no raw op {name} (it is plain PyTorch)")
    return getattr(torch.ops.fusedattn, prefix + name)


# --------------------------------------------------------------------------------------------------------------
# Tolerance: FlashAttention's rule. The kernel may be at most `factor` times as far from the float64 reference as
# the same computation done by PyTorch in the input dtype ("base"), plus a small absolute slack for fp32.
# --------------------------------------------------------------------------------------------------------------


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in float64, counting equal infinities (e.g. lse = -inf on both sides) and NaN-vs-NaN as
    agreement and a NaN / inf on one side only as an infinite error."""
    if a.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs reference {tuple(ref.shape)}")
    if a.numel() == 0:
        return 0.0
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    same = (a == ref) | (a.isnan() & ref.isnan())
    diff = (a - ref).abs().masked_fill(same, 0.0)
    return torch.nan_to_num(diff, nan=float("inf")).max().item()


def assert_close_2x(
    out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, factor: float = 2, atol: float = 1e-5, name: str = "out"
) -> None:
    """Assert max|out - ref| <= factor * max|base - ref| + atol (use factor=3 for gradients)."""
    assert out.dtype == base.dtype, f"{name}: dtype {out.dtype}, expected {base.dtype}"
    err = max_abs_err(out, ref)
    base_err = max_abs_err(base, ref)
    assert base_err != float("inf"), f"{name}: baseline disagrees with the reference on NaN/inf positions"
    bound = factor * base_err + atol
    assert err <= bound, f"{name}: max abs err {err:.3e} > {factor} x baseline err {base_err:.3e} + {atol:g}"


# --------------------------------------------------------------------------------------------------------------
# Randomness: every test draws from its own generator, seeded from its node id, so a test's inputs do not
# depend on which other tests ran before it.
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def gen(request) -> torch.Generator:
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)  # for the few torch APIs that take no generator
    return torch.Generator().manual_seed(seed)


def randn(
    *shape: int,
    dtype: torch.dtype = torch.float32,
    gen: torch.Generator = None,
    requires_grad: bool = False,
    device: str = "cpu",
) -> torch.Tensor:
    """Standard normal drawn in float32 on the CPU (so every dtype and device sees the same values) and cast to
    `dtype` on `device`."""
    t = torch.randn(*shape, generator=gen).to(device, dtype)
    return t.requires_grad_(requires_grad)


def to_device(device: str, *tensors):
    """The tensors moved to `device` (None stays None); one tensor in, one out."""
    out = tuple(None if t is None else t.to(device) for t in tensors)
    return out if len(out) != 1 else out[0]


# --------------------------------------------------------------------------------------------------------------
# Gradients: what every backward comparison runs on the kernel, the float64 reference and the baseline.
# --------------------------------------------------------------------------------------------------------------


def grads(fn, inputs, g_out, g_lse=None, *, finite_lse_only: bool = False):
    """Gradients of <out, g_out> (+ <lse, g_lse>) with respect to `inputs`, through fn(*inputs) -> (out, lse).
    finite_lse_only: g_lse only where lse is finite (rows that see no key have lse -inf and no gradient)."""
    inputs = [x.detach().requires_grad_() for x in inputs]  # detach keeps the strides
    out, lse = fn(*inputs)
    outputs, cotangents = [out], [g_out.to(out.device, out.dtype)]
    if g_lse is not None:
        g_lse = g_lse.to(lse.device)
        if finite_lse_only:
            g_lse = g_lse * ~lse.detach().isinf()
        outputs.append(lse)
        cotangents.append(g_lse.to(lse.dtype))
    return torch.autograd.grad(outputs, inputs, cotangents)


# --------------------------------------------------------------------------------------------------------------
# Pairwise (all-pairs) grids: every value of every factor meets every value of every other factor in at least
# one case. This covers the interactions that break kernels (e.g. head_dim x lengths, GQA x mask) with a few
# dozen cases instead of the thousands of a full cartesian product.
# --------------------------------------------------------------------------------------------------------------


def pairwise(factors: dict[str, Sequence]) -> list[dict]:
    """Deterministic greedy covering array of strength 2 over `factors` (name -> list of values)."""
    names = list(factors)
    if len(names) < 2:
        return [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]
    uncovered = set()
    for a, b in itertools.combinations(range(len(names)), 2):
        for ia, ib in itertools.product(range(len(factors[names[a]])), range(len(factors[names[b]]))):
            uncovered.add((a, ia, b, ib))
    cases = []
    while uncovered:
        # Seed the new case with the smallest uncovered pair, then fill the other factors greedily with the
        # value that covers the most still-uncovered pairs (ties: the first value).
        a, ia, b, ib = min(uncovered)
        choice = {a: ia, b: ib}
        for f in range(len(names)):
            if f in choice:
                continue
            best, best_gain = 0, -1
            for iv in range(len(factors[names[f]])):
                gain = sum(((g, choice[g], f, iv) if g < f else (f, iv, g, choice[g])) in uncovered for g in choice)
                if gain > best_gain:
                    best, best_gain = iv, gain
            choice[f] = best
        for g, h in itertools.combinations(sorted(choice), 2):
            uncovered.discard((g, choice[g], h, choice[h]))
        cases.append({names[f]: factors[names[f]][choice[f]] for f in range(len(names))})
    return cases


def case_id(case: dict) -> str:
    """Readable pytest id for a pairwise case."""
    parts = []
    for key, val in case.items():
        if isinstance(val, torch.dtype):
            val = str(val).replace("torch.", "")
        elif isinstance(val, tuple):
            val = "x".join(str(x) for x in val)
        parts.append(f"{key}={val}")
    return "-".join(parts)
