"""Variable-length (packed) attention, fusedattn.varlen_attention and torch.ops.fusedattn.varlen_fwd / varlen_bwd,
against the reference under FlashAttention's 2x rule (3x for gradients).

Every grid case is one packed batch holding sequences of lengths 0, 1, 17, 97 and 257 with Lq != Lk in most of
them (including sequences with no queries and sequences with no keys), so a kernel that mixes up sequence
offsets, reads past a sequence's end or aligns the causal diagonal globally instead of per sequence fails. The
main grid is pairwise over dtype x causal x head dim x GQA x window x softcap.

Tests run on every backend of tests/conftest.py ("cpu", "triton" on a GPU or on the CPU through
TRITON_INTERPRET=1, where the shapes shrink to keep the interpreter fast, "cuda", "reference"); a case a backend
cannot serve (there is no CUDA C++ varlen kernel) is skipped with the dispatcher's reason.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fusedattn
from conftest import assert_close_2x, case_id, device_for, grads, interpreted, pairwise, randn, skip_unsupported
from fusedattn.reference import varlen_attention_ref

fwd_op = torch.ops.fusedattn.varlen_fwd
bwd_op = torch.ops.fusedattn.varlen_bwd

# (Lq, Lk) of the sequences packed into one batch: empty sides, single tokens, odd lengths, Lq != Lk both ways,
# and neighbours of equal lengths (the CPU op runs those as one batched kernel call).
SEQS = [
    (17, 17),
    (17, 17),
    (0, 13),
    (1, 97),
    (97, 1),
    (97, 1),
    (257, 257),
    (13, 0),
    (13, 0),
    (97, 257),
    (257, 17),
    (0, 0),
    (1, 1),
    (1, 1),
    (1, 1),
]
SEQS_TINY = [(5, 5), (5, 5), (0, 3), (1, 9), (9, 1), (3, 0), (17, 6), (0, 0)]  # Triton interpreter
HEADS = {"mha": (2, 2), "gqa": (6, 2), "mqa": (4, 1)}  # name -> (Hq, Hkv)
HEADS_TINY = {"mha": (1, 1), "gqa": (4, 2), "mqa": (3, 1)}  # Triton interpreter
GRID = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
        "causal": [False, True],
        "D": [32, 64, 128, 256, 80],
        "heads": ["mha", "gqa", "mqa"],
        "window": [(-1, -1), (16, 0), (5, 40)],
        "softcap": [0.0, 5.0],
    }
)


# ---------------------------------------------------------------------------------------------- helpers


def seqs_for(backend):
    return SEQS_TINY if interpreted(backend) else SEQS


def heads_for(backend, name):
    return (HEADS_TINY if interpreted(backend) else HEADS)[name]


def cu(lengths, device="cpu"):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)


def make_packed(gen, seqs, *, Hq=4, Hkv=2, D=32, Dv=None, dtype=torch.float32, device="cpu", q_mult=1.0):
    """Packed q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) and the varlen index arguments."""
    Dv = Dv or D
    lq, lk = [a for a, _ in seqs], [b for _, b in seqs]
    q = (randn(sum(lq), Hq, D, gen=gen) * q_mult).to(dtype)
    k, v = randn(sum(lk), Hkv, D, dtype=dtype, gen=gen), randn(sum(lk), Hkv, Dv, dtype=dtype, gen=gen)
    return dict(
        q=q.to(device),
        k=k.to(device),
        v=v.to(device),
        cu_seqlens_q=cu(lq, device),
        cu_seqlens_k=cu(lk, device),
        max_seqlen_q=max(lq, default=0),
        max_seqlen_k=max(lk, default=0),
    )


def run(backend, x, **kw):
    """varlen_attention on `backend`; skips the test where it cannot serve the case (the dispatcher's reason)."""
    skip_unsupported(
        "varlen",
        backend,
        dtype=x["q"].dtype,
        head_dim=x["q"].shape[-1],
        value_dim=x["v"].shape[-1],
        softcap=kw.get("softcap", 0.0),
    )
    return fusedattn.varlen_attention(
        x["q"],
        x["k"],
        x["v"],
        x["cu_seqlens_q"],
        x["cu_seqlens_k"],
        x["max_seqlen_q"],
        x["max_seqlen_k"],
        return_lse=True,
        backend=backend,
        **kw,
    )


def ref_call(x, compute_dtype, **kw):
    cast = (lambda t: t.double()) if compute_dtype == torch.float64 else (lambda t: t)
    return varlen_attention_ref(
        cast(x["q"]).cpu(),
        cast(x["k"]).cpu(),
        cast(x["v"]).cpu(),
        x["cu_seqlens_q"].cpu(),
        x["cu_seqlens_k"].cpu(),
        return_lse=True,
        compute_dtype=compute_dtype,
        **kw,
    )


def check_forward(backend, x, **kw):
    out, lse = run(backend, x, **kw)
    ref, ref_lse = ref_call(x, torch.float64, **kw)
    base, base_lse = ref_call(x, x["q"].dtype, **kw)
    assert out.shape == base.shape and out.dtype == x["q"].dtype and out.device == x["q"].device
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_close_2x(out.cpu(), ref, base)
    assert_close_2x(lse.cpu(), ref_lse, base_lse, name="lse")
    return out, lse


def check_backward(backend, x, gen, use_lse=False, **kw):
    total_q, Hq, _ = x["q"].shape
    dt = x["q"].dtype
    g_out = randn(total_q, Hq, x["v"].shape[-1], dtype=dt, gen=gen)
    g_lse = randn(Hq, total_q, gen=gen) if use_lse else None
    qkv = [x["q"], x["k"], x["v"]]

    def with_qkv(q, k, v):
        return dict(x, q=q, k=k, v=v)

    got = grads(lambda *t: run(backend, with_qkv(*t), **kw), qkv, g_out, g_lse)
    ref = grads(
        lambda *t: ref_call(with_qkv(*t), torch.float64, **kw),
        [t.cpu().double() for t in qkv],
        g_out.double(),
        None if g_lse is None else g_lse.double(),
    )
    base = grads(lambda *t: ref_call(with_qkv(*t), dt, **kw), [t.cpu() for t in qkv], g_out, g_lse)
    # Absolute floor relative to the largest gradient (see tests/test_attention.py: the baseline's softmax backward
    # can be exact where a flash backward's dP - rowsum(dO * O) leaves rounding noise).
    atol = 1e-5 * max([1.0] + [r.abs().max().item() for r in ref if r is not None and r.numel()])
    for name, g, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert g.shape == b.shape and g.dtype == dt, name
        assert_close_2x(g.cpu(), r, b, factor=3, atol=atol, name=name)


# ---------------------------------------------------------------------------------------------- main grid


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_forward_backward_vs_reference(backend, case, gen):
    Hq, Hkv = heads_for(backend, case["heads"])
    x = make_packed(
        gen,
        seqs_for(backend),
        Hq=Hq,
        Hkv=Hkv,
        D=case["D"],
        dtype=case["dtype"],
        device=device_for(backend),
        q_mult=3.0 if case["softcap"] else 1.0,
    )  # large scores: the cap bites
    kw = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    check_forward(backend, x, **kw)
    check_backward(backend, x, gen, use_lse=case["D"] in (64, 80), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_head_dim_and_scale(backend, dtype, gen):
    x = make_packed(gen, seqs_for(backend), Hq=4, Hkv=2, D=48, Dv=24, dtype=dtype, device=device_for(backend))
    check_forward(backend, x, causal=True, scale=0.3)
    check_backward(backend, x, gen, causal=True, scale=0.3)


# ---------------------------------------------------------------------------------------------- against dense


def _left_padded(t, lengths, L):
    """Packed (total, H, E) -> (B, H, L, E), each sequence's rows at the end (left padding with zeros)."""
    out = t.new_zeros(len(lengths), t.shape[1], L, t.shape[2])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :, L - n :] = t[start : start + n].transpose(0, 1)
        start += n
    return out


@pytest.mark.parametrize(
    "causal,window,softcap", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (True, (20, 0), 4.0), (False, (7, 9), 0.0)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_equals_dense_attention(backend, causal, window, softcap, dtype, gen):
    """varlen == fusedattn.attention run on each sequence alone, and == one left-padded dense batch whose padded
    keys are masked out (left padding keeps each sequence's bottom-right diagonal where it was)."""
    seqs = seqs_for(backend)
    x = make_packed(gen, seqs, Hq=6, Hkv=2, D=64, dtype=dtype, device=device_for(backend))
    kw = dict(causal=causal, window=window, softcap=softcap)
    out, lse = run(backend, x, **kw)
    lq, lk = [a for a, _ in seqs], [b for _, b in seqs]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)

    cq, ck = x["cu_seqlens_q"].tolist(), x["cu_seqlens_k"].tolist()
    for b in range(len(seqs)):
        qb = x["q"][cq[b] : cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
        kb = x["k"][ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = x["v"][ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
        ob, lb = fusedattn.attention(qb, kb, vb, return_lse=True, backend=backend, **kw)
        torch.testing.assert_close(out[cq[b] : cq[b + 1]], ob[0].transpose(0, 1), **tol)
        torch.testing.assert_close(lse[:, cq[b] : cq[b + 1]], lb[0], **tol)

    Lq, Lk = max(lq), max(lk)
    qp, kp, vp = (_left_padded(x[n], lens, L) for n, lens, L in (("q", lq, Lq), ("k", lk, Lk), ("v", lk, Lk)))
    keep = torch.arange(Lk, device=qp.device) >= Lk - torch.tensor(lk, device=qp.device)[:, None]  # (B, Lk)
    op, lp = fusedattn.attention(qp, kp, vp, attn_mask=keep[:, None, None, :], return_lse=True, backend=backend, **kw)
    torch.testing.assert_close(out, torch.cat([op[b, :, Lq - n :].transpose(0, 1) for b, n in enumerate(lq)]), **tol)
    torch.testing.assert_close(lse, torch.cat([lp[b, :, Lq - n :] for b, n in enumerate(lq)], dim=1), **tol)


# ---------------------------------------------------------------------------------------------- layout, edges


def test_strided_inputs_from_packed_qkv(backend, gen):
    """q, k, v as slices of one packed (total, 3, H, D) tensor, v also strided in its head dim: same numbers as
    contiguous copies (no hidden reliance on contiguity), gradients included."""
    seqs = [(n, n) for n, _ in seqs_for(backend)]
    total = sum(n for n, _ in seqs)
    qkv = randn(total, 3, 4, 64, gen=gen)
    x = make_packed(gen, seqs, Hq=4, Hkv=4, D=64, device=device_for(backend))
    x.update(q=qkv[:, 0].to(x["q"].device), k=qkv[:, 1].to(x["q"].device), v=qkv[:, 2, :, ::2].to(x["q"].device))
    assert not (x["q"].is_contiguous() or x["k"].is_contiguous() or x["v"].is_contiguous())
    check_forward(backend, x, causal=True)
    check_backward(backend, x, gen, causal=True)
    out = run(backend, x, causal=True)[0]
    out_c = run(backend, {**x, **{n: x[n].contiguous() for n in ("q", "k", "v")}}, causal=True)[0]
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)


@pytest.mark.parametrize("seqs", [[], [(0, 0)], [(0, 5), (0, 0)], [(4, 0), (0, 0), (3, 0)]], ids=str)
def test_empty_inputs_and_sequences(backend, seqs, gen):
    x = make_packed(gen, seqs, Hq=4, Hkv=2, D=16, Dv=24, device=device_for(backend))
    for n in ("q", "k", "v"):
        x[n].requires_grad_()
    out, lse = run(backend, x, causal=True)
    if not seqs and not out.requires_grad:
        # found by running this grid on the reference backend: varlen_attention_ref gives an empty batch outputs
        # outside the autograd graph (fusedattn/reference.py; the fused kernels' outputs have a grad_fn)
        pytest.xfail(f"{backend}: an empty batch's outputs do not require grad")
    total_q = sum(a for a, _ in seqs)
    assert out.shape == (total_q, 4, 24) and lse.shape == (4, total_q)
    assert (out == 0).all(), "a query that sees no key must output 0"
    assert (lse == -math.inf).all(), "lse of a row with no key is -inf"
    (out.sum() + lse.clamp_min(0).sum()).backward()
    for n in ("q", "k", "v"):
        assert x[n].grad is not None and x[n].grad.shape == x[n].shape and (x[n].grad == 0).all(), n


def test_reference_backend(gen):
    x = make_packed(gen, SEQS[:6], Hq=4, Hkv=2, D=32)
    out, lse = run("reference", x, causal=True, window=(9, 0), softcap=3.0)
    ref, ref_lse = ref_call(x, torch.float32, causal=True, window=(9, 0), softcap=3.0)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)


def test_nan_stays_in_its_sequence(backend, gen):
    """A NaN in one sequence's keys reaches only that sequence's rows (no bleed across packed neighbours)."""
    seqs = seqs_for(backend)[:4]
    x = make_packed(gen, seqs, Hq=2, Hkv=2, D=32, device=device_for(backend))
    cq, ck = x["cu_seqlens_q"].tolist(), x["cu_seqlens_k"].tolist()
    b = next(i for i, (a, c) in enumerate(seqs) if a > 0 and c > 0)
    x["k"][ck[b]] = math.nan  # first key of sequence b
    out, _ = run(backend, x)
    assert out[cq[b] : cq[b + 1]].isnan().all()
    rest = torch.cat([out[: cq[b]], out[cq[b + 1] :]])
    assert not rest.isnan().any()


# ---------------------------------------------------------------------------------------------- opcheck, compile


def _op_args(gen, requires_grad=False, dtype=torch.float32):
    x = make_packed(gen, [(3, 5), (0, 2), (4, 1), (2, 0)], Hq=4, Hkv=2, D=8, Dv=12, dtype=dtype)
    q, k, v = (x[n].requires_grad_(requires_grad) for n in ("q", "k", "v"))
    return (q, k, v, x["cu_seqlens_q"], x["cu_seqlens_k"], x["max_seqlen_q"], x["max_seqlen_k"], 0.35, 3, 0, True, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_fwd(gen, dtype, requires_grad):
    torch.library.opcheck(fwd_op.default, _op_args(gen, requires_grad, dtype))


@pytest.mark.parametrize("with_grad_lse", [False, True])
def test_opcheck_bwd(gen, with_grad_lse):
    args = _op_args(gen)
    out, lse = fwd_op(*args)
    grad_out, grad_lse = randn(*out.shape, gen=gen), randn(*lse.shape, gen=gen) if with_grad_lse else None
    bwd_args = (grad_out, *args[:3], out, lse, *args[3:], grad_lse)
    torch.library.opcheck(bwd_op.default, bwd_args)


class _Packed(torch.nn.Module):
    def forward(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int):
        out, lse = fusedattn.varlen_attention(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window=(40, -1), return_lse=True
        )
        return out, lse


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(gen, backend):
    torch._dynamo.reset()
    x = make_packed(gen, [(11, 13), (0, 4), (7, 7), (5, 0)], Hq=4, Hkv=2, D=16)
    q, k, v = (x[n].requires_grad_() for n in ("q", "k", "v"))
    args = (q, k, v, x["cu_seqlens_q"], x["cu_seqlens_k"], x["max_seqlen_q"], x["max_seqlen_k"])
    model = _Packed()
    out_c, lse_c = torch.compile(model, fullgraph=True, backend=backend)(*args)
    out_e, lse_e = model(*args)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_c, lse_e, atol=1e-5, rtol=1e-5)
    g = randn(*out_e.shape, gen=gen)
    finite = lse_e.isfinite()
    grads_c = torch.autograd.grad((out_c * g).sum() + lse_c[finite].sum(), (q, k, v))
    grads_e = torch.autograd.grad((out_e * g).sum() + lse_e[finite].sum(), (q, k, v))
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-5)


def test_compiled_call_still_checks_cu_seqlens(gen):
    """Under torch.compile the wrapper skips its value checks; the op's own checks still refuse bad offsets."""
    torch._dynamo.reset()
    x = make_packed(gen, [(3, 5), (4, 2)], Hq=2, Hkv=2, D=8)
    bad_k = torch.tensor([0, 10**6, 7], dtype=torch.int32)
    model = torch.compile(_Packed(), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="cu_seqlens_k"):
        model(x["q"], x["k"], x["v"], x["cu_seqlens_q"], bad_k, x["max_seqlen_q"], 10**6)


# ---------------------------------------------------------------------------------------------- bad inputs


def _valid(gen):
    return make_packed(gen, [(3, 5), (0, 2), (4, 4)], Hq=4, Hkv=2, D=16)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


# name: (mutation of the valid inputs, argument the error names, whether the raw op checks it too: device checks
# need real tensors, which only the Python wrapper can refuse before the dispatcher picks a kernel)
BAD_INPUTS = {
    "cu_q_not_monotone": (lambda x: {**x, "cu_seqlens_q": _i32(0, 4, 3, 7)}, "cu_seqlens_q", True),
    "cu_k_not_monotone": (lambda x: {**x, "cu_seqlens_k": _i32(0, 6, 5, 11)}, "cu_seqlens_k", True),
    "cu_k_int64": (lambda x: {**x, "cu_seqlens_k": x["cu_seqlens_k"].long()}, "cu_seqlens_k", True),
    "cu_q_float": (lambda x: {**x, "cu_seqlens_q": x["cu_seqlens_q"].float()}, "cu_seqlens_q", True),
    "cu_q_2d": (lambda x: {**x, "cu_seqlens_q": x["cu_seqlens_q"][None]}, "cu_seqlens_q", True),
    "cu_q_empty": (lambda x: {**x, "cu_seqlens_q": _i32()}, "cu_seqlens_q", True),
    "cu_q_last_short": (lambda x: {**x, "cu_seqlens_q": _i32(0, 3, 3, 6)}, "cu_seqlens_q", True),
    "cu_k_last_past_end": (lambda x: {**x, "cu_seqlens_k": _i32(0, 5, 7, 10**6)}, "cu_seqlens_k", True),
    "cu_k_first_nonzero": (lambda x: {**x, "cu_seqlens_k": _i32(1, 5, 7, 11)}, "cu_seqlens_k", True),
    "cu_k_negative": (lambda x: {**x, "cu_seqlens_k": _i32(0, -5, 7, 11)}, "cu_seqlens_k", True),
    "cu_lengths_differ": (lambda x: {**x, "cu_seqlens_k": _i32(0, 11)}, "cu_seqlens", True),
    "max_seqlen_q_too_small": (lambda x: {**x, "max_seqlen_q": 3}, "max_seqlen_q", True),
    "max_seqlen_k_too_small": (lambda x: {**x, "max_seqlen_k": 4}, "max_seqlen_k", True),
    "max_seqlen_k_negative": (lambda x: {**x, "max_seqlen_k": -1}, "max_seqlen_k", True),
    "heads_not_a_multiple": (lambda x: {**x, "q": torch.zeros(7, 3, 16)}, "heads", True),
    "v_heads": (lambda x: {**x, "v": x["v"][:, :1]}, r"\bv must have k's tokens and heads", True),
    "k_head_dim": (lambda x: {**x, "k": x["k"][..., :8]}, "k head dim", True),
    "k_dtype": (lambda x: {**x, "k": x["k"].to(torch.bfloat16)}, r"\bk\b", True),
    "q_4d": (lambda x: {**x, "q": x["q"][None]}, r"\bq must be 3-D", True),
    "q_int": (lambda x: {**x, "q": x["q"].int()}, r"\bq\b", True),
    "k_device": (lambda x: {**x, "k": x["k"].to("meta")}, r"\bk must be on q's device", False),
    "cu_q_device": (lambda x: {**x, "cu_seqlens_q": x["cu_seqlens_q"].to("meta")}, "cu_seqlens_q", False),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=str)
def test_bad_inputs_raise_naming_the_argument(gen, case):
    mutate, name, raw_op_checks = BAD_INPUTS[case]
    x = mutate(_valid(gen))
    with pytest.raises(ValueError, match=name):
        run("cpu", x)
    if raw_op_checks:  # the op itself (what compiled code calls) refuses it too, before any access
        args = (
            x["q"],
            x["k"],
            x["v"],
            x["cu_seqlens_q"],
            x["cu_seqlens_k"],
            x["max_seqlen_q"],
            x["max_seqlen_k"],
            0.25,
            -1,
            -1,
            True,
            0.0,
        )
        with pytest.raises(RuntimeError, match=name):
            fwd_op(*args)
        total_q, Hq = x["q"].shape[:2]
        g = torch.zeros(total_q, Hq, x["v"].shape[-1]) if x["v"].dim() == 3 else torch.zeros(1)
        lse = torch.zeros(Hq, total_q)
        with pytest.raises(RuntimeError, match=name):
            bwd_op(g, *args[:3], g, lse, *args[3:], None)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(window=(-2, 0)), "window"),
        (dict(softcap=-1.0), "softcap"),
        (dict(scale=math.inf), "scale"),
        (dict(backend="nope"), "backend"),
    ],
)
def test_bad_scalars(gen, kw, name):
    x = _valid(gen)
    with pytest.raises(ValueError, match=name):
        fusedattn.varlen_attention(
            x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_k"], x["max_seqlen_q"], x["max_seqlen_k"], **kw
        )


def test_raw_bwd_checks_its_own_tensors(gen):
    args = _op_args(gen)
    out, lse = fwd_op(*args)
    for bad_out, bad_lse, name in (
        (out[:-1], lse, "out"),
        (out, lse.t().contiguous(), "lse"),
        (out, lse.double(), "lse"),
    ):
        with pytest.raises(RuntimeError, match=name):
            bwd_op(out, *args[:3], bad_out, bad_lse, *args[3:], None)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd_op(out.double(), *args[:3], out, lse, *args[3:], None)
    with pytest.raises(RuntimeError, match="grad_lse"):
        bwd_op(out, *args[:3], out, lse, *args[3:], lse[:1])


# ---------------------------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_torch_func_grad_and_jacrev(backend, transform, gen):
    """torch.func.grad / jacrev run through varlen_attention (they raised "must override setup_context") and agree
    with the reference's under the 3x rule; differentiating a fused backward once more still raises."""
    x = make_packed(gen, [(3, 4), (0, 2), (4, 4), (2, 0)], Hq=2, Hkv=1, D=8, device=device_for(backend))
    skip_unsupported("varlen", backend, dtype=torch.float32, head_dim=8)
    weight = randn(*x["q"].shape, gen=gen)

    def call(fn, w):
        if transform == "grad":
            return torch.func.grad(lambda q, k, v: (fn(dict(x, q=q, k=k, v=v)) * w).sum(), argnums=(0, 1, 2))
        return torch.func.jacrev(lambda q, k, v: fn(dict(x, q=q, k=k, v=v)), argnums=(0, 1, 2))

    def ours(y):
        return run(backend, y, causal=True)[0]

    def ref(dtype):
        return lambda y: ref_call(y, dtype, causal=True)[0]

    q, k, v = x["q"], x["k"], x["v"]
    got = call(ours, weight.to(q.device))(q, k, v)
    want = call(ref(torch.float64), weight.double())(q.cpu().double(), k.cpu().double(), v.cpu().double())
    base = call(ref(torch.float32), weight)(q.cpu(), k.cpu(), v.cpu())
    for name, g, r, b in zip("qkv", got, want, base):
        assert_close_2x(g.cpu(), r, b, factor=3, name=f"{transform} d{name}")
    if backend != "reference":  # the reference differentiates twice
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.func.grad(lambda q: call(ours, weight.to(q.device))(q, k, v)[1].sum())(q)
