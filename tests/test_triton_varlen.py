"""Triton kernels beyond the shared grid of test_attention.py: the varlen entry point
(fusedattn.kernels.attention.varlen_attention) against a per-sequence loop over the reference, its ops
(opcheck, torch.compile), deterministic gradients, and the block-skipping of windowed / causal loops with small
blocks. Runs on a GPU, or on the CPU through TRITON_INTERPRET=1 (small shapes); skipped without triton.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_2x, case_id, device_for, grads, interpreted, pairwise, randn, unavailable_reason
from fusedattn.reference import attention_ref

REASON = unavailable_reason("triton")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend: {REASON}")
DEVICE = device_for("triton")
INTERPRETED = interpreted("triton")

if REASON is None:
    from fusedattn.kernels import attention as ka

# (seqlens_q, seqlens_k): empty sequences, Lq != Lk both ways, a single token.
SEQLENS = {
    "mixed": ([5, 17, 1], [9, 17, 30]),
    "empty": ([0, 12, 7], [6, 0, 20]),
    "one": ([23], [23]),
}
GRID = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
        "causal": [False, True],
        "window": [(-1, -1), (4, 2), (-1, 3)],
        "seqlens": list(SEQLENS),
        "heads": [(2, 2), (4, 2), (4, 1)],
        "head_dim": [(16, 16), (40, 40), (64, 24)],
        "softcap": [0.0, 5.0],
    }
)


def cu(lens):
    return torch.tensor([0] + list(lens), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def make_inputs(case, gen):
    lq, lk = SEQLENS[case["seqlens"]]
    Hq, Hkv = case["heads"]
    D, Dv = case["head_dim"]
    dt = case["dtype"]
    q = randn(sum(lq), Hq, D, dtype=dt, gen=gen)
    k = randn(sum(lk), Hkv, D, dtype=dt, gen=gen)
    v = randn(sum(lk), Hkv, Dv, dtype=dt, gen=gen)
    return q, k, v, lq, lk


def varlen_ref(q, k, v, lq, lk, *, causal, window, softcap, scale, compute_dtype):
    """Per-sequence loop over attention_ref: out (total_q, Hq, Dv), lse (Hq, total_q)."""
    outs, lses = [], []
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    for b in range(len(lq)):
        qb = q[cq[b] : cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
        kb = k[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
        out, lse = attention_ref(
            qb,
            kb,
            vb,
            causal=causal,
            causal_align="bottom_right",
            window=window,
            softcap=softcap,
            scale=scale,
            return_lse=True,
            compute_dtype=compute_dtype,
        )
        outs.append(out[0].transpose(0, 1))  # (Lq, Hq, Dv)
        lses.append(lse[0])  # (Hq, Lq)
    return torch.cat(outs), torch.cat(lses, dim=1)


def run(q, k, v, lq, lk, **kw):
    return ka.varlen_attention(q, k, v, cu(lq).to(q.device), cu(lk).to(q.device), max(lq), max(lk), **kw)


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_varlen_forward_backward(case, gen):
    q, k, v, lq, lk = make_inputs(case, gen)
    kw = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"], scale=0.7 / q.shape[-1] ** 0.5)
    g_out = randn(q.shape[0], q.shape[1], v.shape[-1], gen=gen)
    g_lse = randn(q.shape[1], q.shape[0], gen=gen)
    qd, kd, vd, god, gld = (t.to(DEVICE) for t in (q, k, v, g_out, g_lse))

    out, lse = run(qd, kd, vd, lq, lk, **kw)
    ref, ref_lse = varlen_ref(q.double(), k.double(), v.double(), lq, lk, compute_dtype=torch.float64, **kw)
    base, base_lse = varlen_ref(q, k, v, lq, lk, compute_dtype=q.dtype, **kw)
    assert out.shape == base.shape and lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    assert_close_2x(out.cpu(), ref, base)
    assert_close_2x(lse.cpu(), ref_lse, base_lse, name="lse")

    # rows with no key: lse -inf, no gradient through it
    got = grads(lambda *x: run(*x, lq, lk, **kw), [qd, kd, vd], god, gld, finite_lse_only=True)
    ref_g = grads(
        lambda *x: varlen_ref(*x, lq, lk, compute_dtype=torch.float64, **kw),
        [q.double(), k.double(), v.double()],
        g_out.double(),
        g_lse.double(),
        finite_lse_only=True,
    )
    base_g = grads(
        lambda *x: varlen_ref(*x, lq, lk, compute_dtype=q.dtype, **kw), [q, k, v], g_out, g_lse, finite_lse_only=True
    )
    atol = 1e-5 * max([1.0] + [r.abs().max().item() for r in ref_g if r.numel()])
    for name, g, r, b in zip(("dq", "dk", "dv"), got, ref_g, base_g):
        assert_close_2x(g.cpu(), r, b, factor=3, atol=atol, name=name)


def test_varlen_matches_dense_per_sequence(gen):
    """Each packed sequence gives the same numbers as the dense op on that sequence alone."""
    lq, lk = [7, 20], [11, 20]
    q, k, v = (randn(sum(lq), 4, 32, gen=gen), randn(sum(lk), 2, 32, gen=gen), randn(sum(lk), 2, 32, gen=gen))
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    out, lse = run(q, k, v, lq, lk, scale=0.2, causal=True, window=(5, -1))
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    for b in range(2):
        o, l_ = ka.attention(
            q[cq[b] : cq[b + 1]].transpose(0, 1)[None],
            k[ck[b] : ck[b + 1]].transpose(0, 1)[None],
            v[ck[b] : ck[b + 1]].transpose(0, 1)[None],
            None,
            0.2,
            5,
            0,
            True,
            0.0,
        )
        torch.testing.assert_close(out[cq[b] : cq[b + 1]], o[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[:, cq[b] : cq[b + 1]], l_[0], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- ops


def _varlen_args(gen, requires_grad):
    lq, lk = [3, 6], [5, 4]
    q = randn(sum(lq), 4, 16, gen=gen).to(DEVICE).requires_grad_(requires_grad)
    k = randn(sum(lk), 2, 16, gen=gen).to(DEVICE).requires_grad_(requires_grad)
    v = randn(sum(lk), 2, 8, gen=gen).to(DEVICE).requires_grad_(requires_grad)
    return (q, k, v, cu(lq).to(DEVICE), cu(lk).to(DEVICE), max(lq), max(lk), 0.3, 2, 0, 0.0)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_varlen_fwd(gen, requires_grad):
    torch.library.opcheck(torch.ops.fusedattn.triton_varlen_fwd.default, _varlen_args(gen, requires_grad))


@pytest.mark.parametrize("with_grad_lse", [False, True])
def test_opcheck_varlen_bwd(gen, with_grad_lse):
    args = _varlen_args(gen, False)
    out, lse = torch.ops.fusedattn.triton_varlen_fwd(*args)
    g_out = randn(*out.shape, gen=gen).to(DEVICE)
    g_lse = randn(*lse.shape, gen=gen).to(DEVICE) if with_grad_lse else None
    torch.library.opcheck(torch.ops.fusedattn.triton_varlen_bwd.default, (g_out, *args[:3], out, lse, *args[3:], g_lse))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_varlen_torch_compile_fullgraph(gen, backend):
    torch._dynamo.reset()
    q, k, v, cq, ck, mq, mk, *_ = _varlen_args(gen, True)

    def f(q, k, v, cq, ck):
        out, lse = ka.varlen_attention(q, k, v, cq, ck, mq, mk, scale=0.3, causal=True, window=(2, -1))
        return out, lse

    out_c, lse_c = torch.compile(f, fullgraph=True, backend=backend)(q, k, v, cq, ck)
    out_e, lse_e = f(q, k, v, cq, ck)
    torch.testing.assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_c, lse_e, atol=1e-6, rtol=1e-6)
    g = randn(*out_e.shape, gen=gen).to(DEVICE)
    for gc, ge in zip(
        torch.autograd.grad((out_c * g).sum() + lse_c.sum(), (q, k, v)),
        torch.autograd.grad((out_e * g).sum() + lse_e.sum(), (q, k, v)),
    ):
        torch.testing.assert_close(gc, ge, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- kernel internals


def test_backward_is_deterministic(gen):
    """No atomics: two backward passes give bit-identical gradients (GQA: dK/dV summed over a group)."""
    q, k, v = (
        randn(2, 4, 45, 32, dtype=torch.bfloat16, gen=gen).to(DEVICE),
        randn(2, 1, 50, 32, dtype=torch.bfloat16, gen=gen).to(DEVICE),
        randn(2, 1, 50, 32, dtype=torch.bfloat16, gen=gen).to(DEVICE),
    )
    g = randn(2, 4, 45, 32, dtype=torch.bfloat16, gen=gen).to(DEVICE)
    results = []
    for _ in range(2):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = ka.attention(*x, None, 0.2, -1, 0, True, 0.0)
        results.append(torch.autograd.grad(out, x, g))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRETED, reason="block sizes are the autotuner's on a GPU")
@pytest.mark.parametrize("window,bottom_right", [((5, 3), True), ((0, 0), False), ((-1, 0), True), ((7, -1), False)])
def test_small_blocks_skip_the_right_tiles(gen, monkeypatch, window, bottom_right):
    """With 16-row blocks a window leaves whole key / query blocks out of the loops: the loop bounds must still
    cover every visible (query, key) pair, forward and backward."""
    monkeypatch.setitem(ka._INTERPRET_CONFIG, "BLOCK_M", 16)
    monkeypatch.setitem(ka._INTERPRET_CONFIG, "BLOCK_N", 16)
    q, k, v = randn(1, 2, 50, 16, gen=gen), randn(1, 1, 70, 16, gen=gen), randn(1, 1, 70, 16, gen=gen)
    g = randn(1, 2, 50, 16, gen=gen)
    x = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = ka.attention(*x, None, 0.25, window[0], window[1], bottom_right, 0.0)
    dq, dk, dv = torch.autograd.grad(out, x, g)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_ref(
        *x64,
        window=window,
        causal_align="bottom_right" if bottom_right else "top_left",
        scale=0.25,
        return_lse=True,
        compute_dtype=torch.float64,
    )
    rq, rk, rv = torch.autograd.grad(ref, x64, g.double())
    # the window-aligned cases are nonzero only thanks to the offset: a wrong bound drops visible pairs
    for got, want in ((out, ref), (lse, ref_lse), (dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
