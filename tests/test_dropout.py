"""Dropout's random stream (fusedattn/dropout.py): the torch Philox equals Triton's tl.random.philox bit for bit,
and the keep mask has rate 1-p with independent rows, columns, heads and seeds."""

import math

import pytest
import torch

from fusedattn.dropout import dropout_keep, philox4x32

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _philox_words(out, seed, c2, N: tl.constexpr):
    o = tl.arange(0, N)
    c0 = (o * 7919 + 3).to(tl.uint32)
    c1 = (o * 31).to(tl.uint32)
    z = (o * 0).to(tl.uint32)
    a, b, c, d = tl.random.philox(seed, c0, c1, z + c2, z)
    tl.store(out + o * 4, a.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out + o * 4 + 1, b.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out + o * 4 + 2, c.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out + o * 4 + 3, d.to(tl.int64) & 0xFFFFFFFF)


@pytest.mark.parametrize("seed", [0, 12345, -987654321987, 2**62 + 17])
def test_torch_philox_matches_triton(seed):
    N = 64
    out = torch.zeros(N * 4, dtype=torch.int64)
    _philox_words[(1,)](out, seed, 5, N=N)
    o = torch.arange(N)
    words = philox4x32(seed & (2**64 - 1), o * 7919 + 3, o * 31, torch.full_like(o, 5), torch.zeros_like(o))
    assert torch.equal(out, torch.stack(words, -1).reshape(-1))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    B, H, Lq, Lk = 2, 3, 67, 129
    keep = dropout_keep(123, B, H, Lq, Lk, p).to(torch.float64)
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)  # binomial, 5 sigma

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).mean() / (a.std() * b.std())

    bound = 5 / math.sqrt(n / 2)
    assert abs(corr(keep[..., 1:].flatten(), keep[..., :-1].flatten())) < bound  # neighbouring columns
    assert abs(corr(keep[..., 1:, :].flatten(), keep[..., :-1, :].flatten())) < bound  # neighbouring rows
    assert abs(corr(keep[:, 1:].flatten(), keep[:, :-1].flatten())) < bound  # heads
    assert abs(corr(keep[1:].flatten(), keep[:-1].flatten())) < bound  # batches
    other = dropout_keep(124, B, H, Lq, Lk, p).to(torch.float64)
    assert abs(corr(keep.flatten(), other.flatten())) < 5 / math.sqrt(n)  # seeds
    assert torch.equal(keep, dropout_keep(123, B, H, Lq, Lk, p).to(torch.float64))  # deterministic
