"""Shared test helpers: the 2x tolerance rule, a per-test seeded generator, and a pairwise case builder.

Nothing here imports fusedattn, so tests of the pure-PyTorch reference run even when the extension is not
built.
"""

from __future__ import annotations

import itertools
import os
import zlib
from typing import Dict, List, Sequence

import pytest
import torch

# Without a GPU, the "triton" cases of the test grids run the Triton kernels through Triton's interpreter
# (numpy, on the CPU; reduced grids). This has to be decided before triton is first imported (fusedattn imports
# it when the triton backend is usable); TRITON_INTERPRET=0 in the environment opts out.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


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


def assert_close_2x(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, factor: float = 2, atol: float = 1e-5,
                    name: str = "out") -> None:
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


def randn(*shape: int, dtype: torch.dtype = torch.float32, gen: torch.Generator = None,
          requires_grad: bool = False) -> torch.Tensor:
    """Standard normal drawn in float32 (so every dtype sees the same values) and cast to `dtype`."""
    t = torch.randn(*shape, generator=gen).to(dtype)
    return t.requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------------------------
# Pairwise (all-pairs) grids: every value of every factor meets every value of every other factor in at least
# one case. This covers the interactions that break kernels (e.g. head_dim x lengths, GQA x mask) with a few
# dozen cases instead of the thousands of a full cartesian product.
# --------------------------------------------------------------------------------------------------------------


def pairwise(factors: Dict[str, Sequence]) -> List[dict]:
    """Deterministic greedy covering array of strength 2 over `factors` (name -> list of values)."""
    names = list(factors)
    if len(names) < 2:
        return [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]
    uncovered = set()
    for (a, b) in itertools.combinations(range(len(names)), 2):
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
                gain = sum(
                    ((g, choice[g], f, iv) if g < f else (f, iv, g, choice[g])) in uncovered for g in choice
                )
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
