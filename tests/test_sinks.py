"""Attention sinks (gpt-oss): ``sinks=`` in attention, varlen_attention and decode_attention on every backend,
against the float64 reference (which appends the sink as an explicit softmax column), under the 2x rule
(3x for gradients of q, k, v and the sinks); rows that see no key; compile; bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

import fusedattn
from conftest import assert_close_2x, backend_cases, device_for, grads, randn, skip_unsupported
from fusedattn.reference import attention_ref, decode_attention_ref, varlen_attention_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _sinks(H, gen, dtype=torch.float32):
    return (torch.randn(H, generator=gen) * 2).to(dtype)


# ---------------------------------------------------------------------------------------------------- attention
DENSE = [
    dict(B=2, Hq=4, Hkv=2, Lq=17, Lk=97, D=64, causal=False),
    dict(B=1, Hq=2, Hkv=2, Lq=1, Lk=257, D=32, causal=True),
    dict(B=1, Hq=3, Hkv=1, Lq=97, Lk=17, D=128, causal=True),  # Lq > Lk: the first rows see no key
    dict(B=1, Hq=2, Hkv=1, Lq=33, Lk=33, D=80, causal=False, window=(4, 2)),
]
DENSE_SMALL = [
    dict(B=1, Hq=2, Hkv=1, Lq=17, Lk=33, D=32, causal=False),
    dict(B=1, Hq=2, Hkv=2, Lq=9, Lk=5, D=16, causal=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend,case", backend_cases(DENSE, DENSE_SMALL))
def test_attention_sinks(backend, case, dtype, gen):
    skip_unsupported("attention", backend, dtype=dtype, head_dim=case["D"])
    B, Hq, Hkv, Lq, Lk, D = (case[n] for n in ("B", "Hq", "Hkv", "Lq", "Lk", "D"))
    kw = dict(causal=case["causal"], window=case.get("window", (-1, -1)))
    dev = device_for(backend)
    q, k, v = randn(B, Hq, Lq, D, gen=gen), randn(B, Hkv, Lk, D, gen=gen), randn(B, Hkv, Lk, D, gen=gen)
    s = _sinks(Hq, gen)
    g_out, g_lse = randn(B, Hq, Lq, D, gen=gen), randn(B, Hq, Lq, gen=gen)
    inputs = [t.to(dtype) for t in (q, k, v)] + [s]

    def ours(q, k, v, s):
        return fusedattn.attention(q, k, v, sinks=s, return_lse=True, backend=backend, **kw)

    def ref(cdt):
        def f(q, k, v, s):
            return attention_ref(q, k, v, sinks=s, return_lse=True, compute_dtype=cdt, **kw)

        return f

    x_dev = [t.to(dev) for t in inputs]
    out, lse = ours(*x_dev)
    r_out, r_lse = ref(torch.float64)(*[t.double() for t in inputs])
    b_out, b_lse = ref(dtype)(*inputs)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, Hq, Lq)
    assert_close_2x(out.cpu(), r_out, b_out)
    assert_close_2x(lse.cpu(), r_lse, b_lse.float(), name="lse")
    assert torch.isfinite(lse).all()  # a row with no key still has its sink
    dg = grads(ours, x_dev, g_out, g_lse)
    rg = grads(ref(torch.float64), [t.double() for t in inputs], g_out.double(), g_lse.double())
    bg = grads(ref(dtype), inputs, g_out, g_lse)
    for name, a, r, b in zip(("dq", "dk", "dv", "dsinks"), dg, rg, bg):
        assert a.dtype == b.dtype, name
        assert_close_2x(a.cpu(), r, b, factor=3, name=name)


def test_no_key_rows_give_zero_and_the_sink(gen):
    """A row that sees no key: out 0, lse = the sink (its whole mass goes to the sink); never NaN."""
    q, k, v = randn(1, 2, 4, 16, gen=gen), randn(1, 1, 2, 16, gen=gen), randn(1, 1, 2, 16, gen=gen)
    s = torch.tensor([0.5, -1.0])
    out, lse = fusedattn.attention(q, k, v, causal=True, sinks=s, return_lse=True, backend="cpu")
    # bottom-right causal with Lq = 4 > Lk = 2: rows 0 and 1 see no key
    assert (out[:, :, :2] == 0).all()
    torch.testing.assert_close(lse[0, :, :2], s.view(2, 1).expand(2, 2))
    assert torch.isfinite(out).all()


def test_very_negative_sinks_change_nothing(gen):
    q, k, v = randn(1, 2, 7, 32, gen=gen), randn(1, 2, 9, 32, gen=gen), randn(1, 2, 9, 32, gen=gen)
    a, la = fusedattn.attention(q, k, v, return_lse=True, backend="cpu")
    b, lb = fusedattn.attention(q, k, v, sinks=torch.full((2,), -1e4), return_lse=True, backend="cpu")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(la, lb, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- varlen
def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


VARLEN = [dict(seqs=[(17, 33), (0, 5), (5, 0), (1, 1), (40, 40)], Hq=4, Hkv=2, D=64)]
VARLEN_SMALL = [dict(seqs=[(9, 5), (0, 3), (4, 0)], Hq=2, Hkv=1, D=16)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend,case", backend_cases(VARLEN, VARLEN_SMALL))
def test_varlen_sinks(backend, case, dtype, causal, gen):
    skip_unsupported("varlen", backend, dtype=dtype, head_dim=case["D"])
    lq, lk = [a for a, _ in case["seqs"]], [b for _, b in case["seqs"]]
    Hq, Hkv, D = case["Hq"], case["Hkv"], case["D"]
    dev = device_for(backend)
    q, k, v = randn(sum(lq), Hq, D, gen=gen), randn(sum(lk), Hkv, D, gen=gen), randn(sum(lk), Hkv, D, gen=gen)
    s = _sinks(Hq, gen)
    cq, ck = _cu(lq), _cu(lk)
    g_out, g_lse = randn(sum(lq), Hq, D, gen=gen), randn(Hq, sum(lq), gen=gen)
    inputs = [t.to(dtype) for t in (q, k, v)] + [s]

    def ours(q, k, v, s):
        return fusedattn.varlen_attention(
            q, k, v, cq.to(dev), ck.to(dev), max(lq), max(lk), causal=causal, sinks=s, return_lse=True, backend=backend
        )

    def ref(cdt):
        def f(q, k, v, s):
            return varlen_attention_ref(q, k, v, cq, ck, causal=causal, sinks=s, return_lse=True, compute_dtype=cdt)

        return f

    x_dev = [t.to(dev) for t in inputs]
    out, lse = ours(*x_dev)
    r_out, r_lse = ref(torch.float64)(*[t.double() for t in inputs])
    b_out, b_lse = ref(dtype)(*inputs)
    assert out.dtype == dtype and lse.shape == (Hq, sum(lq))
    assert_close_2x(out.cpu(), r_out, b_out)
    assert_close_2x(lse.cpu(), r_lse, b_lse.float(), name="lse")
    dg = grads(ours, x_dev, g_out, g_lse)
    rg = grads(ref(torch.float64), [t.double() for t in inputs], g_out.double(), g_lse.double())
    bg = grads(ref(dtype), inputs, g_out, g_lse)
    for name, a, r, b in zip(("dq", "dk", "dv", "dsinks"), dg, rg, bg):
        assert_close_2x(a.cpu(), r, b, factor=3, name=name)


# ---------------------------------------------------------------------------------------------------- decode
DECODE = [
    dict(B=3, Lq=1, Hq=8, Hkv=2, D=64, lengths=[0, 17, 97], page=None, splits=0),
    dict(B=2, Lq=3, Hq=4, Hkv=4, D=128, lengths=[33, 257], page=16, splits=3),
]
DECODE_SMALL = [dict(B=2, Lq=2, Hq=2, Hkv=1, D=16, lengths=[0, 9], page=4, splits=2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend,case", backend_cases(DECODE, DECODE_SMALL))
def test_decode_sinks(backend, case, dtype, gen):
    skip_unsupported("decode", backend, dtype=dtype, head_dim=case["D"])
    B, Lq, Hq, Hkv, D, page = (case[n] for n in ("B", "Lq", "Hq", "Hkv", "D", "page"))
    lengths = case["lengths"]
    dev = device_for(backend)
    L_max = max(lengths) + 1
    if page is None:
        kc, vc = randn(B, L_max, Hkv, D, gen=gen), randn(B, L_max, Hkv, D, gen=gen)
        table = None
    else:
        per = -(-L_max // page)
        kc, vc = randn(B * per, page, Hkv, D, gen=gen), randn(B * per, page, Hkv, D, gen=gen)
        table = torch.randperm(B * per, generator=gen).to(torch.int32).view(B, per)
    q, kn, vn = randn(B, Lq, Hq, D, gen=gen), randn(B, 1, Hkv, D, gen=gen), randn(B, 1, Hkv, D, gen=gen)
    s = _sinks(Hq, gen)
    seqlens = torch.tensor(lengths, dtype=torch.int32)

    def call(fn, cdt, **extra):
        kcc, vcc = kc.to(cdt), vc.to(cdt)
        return fn(
            q.to(cdt),
            kcc,
            vcc,
            k_new=kn.to(cdt),
            v_new=vn.to(cdt),
            cache_seqlens=seqlens if fn is decode_attention_ref else seqlens.to(kcc.device),
            block_table=table,
            sinks=s.to(cdt),
            return_lse=True,
            **extra,
        )

    with torch.no_grad():
        x = [t.to(dev) for t in (q, kc, vc, kn, vn, s)]
        kcd, vcd = x[1].to(dtype), x[2].to(dtype)
        out, lse = fusedattn.decode_attention(
            x[0].to(dtype),
            kcd,
            vcd,
            cache_seqlens=seqlens.to(dev),
            k_new=x[3].to(dtype),
            v_new=x[4].to(dtype),
            block_table=None if table is None else table.to(dev),
            sinks=x[5],
            num_splits=case["splits"],
            return_lse=True,
            backend=backend,
        )
        r_out, r_lse = call(decode_attention_ref, torch.float64, compute_dtype=torch.float64)
        b_out, b_lse = call(decode_attention_ref, dtype, compute_dtype=dtype)
    assert out.dtype == dtype and lse.shape == (B, Hq, Lq)
    assert_close_2x(out.cpu(), r_out, b_out)
    assert_close_2x(lse.cpu(), r_lse, b_lse.float(), name="lse")


def test_decode_refuses_sinks_that_require_grad(gen):
    q, kc = randn(1, 1, 2, 16, gen=gen), randn(1, 4, 1, 16, gen=gen)
    s = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="inference-only"):
        fusedattn.decode_attention(q, kc, kc.clone(), cache_seqlens=3, sinks=s)
    with torch.no_grad():
        fusedattn.decode_attention(q, kc, kc.clone(), cache_seqlens=3, sinks=s)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "sinks,match",
    [
        (torch.zeros(3), r"sinks must have shape \(Hq,\) = \(2,\)"),
        (torch.zeros(1, 2), r"sinks must have shape"),
        (torch.zeros(2, dtype=torch.int32), "sinks must be a floating-point tensor"),
        ([0.0, 0.0], "sinks must be a torch.Tensor"),
        (torch.zeros(2, device="meta"), "sinks must be on q's device"),
    ],
    ids=["length", "2-D", "int", "list", "device"],
)
def test_bad_sinks(sinks, match, gen):
    q, k = randn(1, 2, 3, 16, gen=gen), randn(1, 1, 5, 16, gen=gen)
    with pytest.raises(ValueError, match=match):
        fusedattn.attention(q, k, k, sinks=sinks)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        fusedattn.varlen_attention(
            q[0].transpose(0, 1), k[0].transpose(0, 1), k[0].transpose(0, 1), cu, cu, 3, 3, sinks=sinks
        )
    with pytest.raises(ValueError, match=match), torch.no_grad():
        fusedattn.decode_attention(
            q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), cache_seqlens=5, sinks=sinks
        )


# ---------------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic, gen):
    def f(q, k, v, s):
        out, lse = fusedattn.attention(q, k, v, causal=True, sinks=s, return_lse=True, backend="cpu")
        return out.sum() + lse.sum()

    cf = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for L in (17, 33):
        x = [randn(1, 2, L, 32, gen=gen, requires_grad=True) for _ in range(3)] + [
            torch.randn(2, generator=gen).requires_grad_()
        ]
        ref = f(*x)
        g_ref = torch.autograd.grad(ref, x)
        got = cf(*x)
        g = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, ref)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b)
    assert not math.isnan(float(got.detach()))
