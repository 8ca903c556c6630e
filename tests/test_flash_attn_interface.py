"""fusedattn.flash_attn_interface (flash-attn 2.x's functions on our kernels), the backward op
torch.ops.fusedattn.attention_backward / varlen_attention_backward, merge_attention_states(layout=, out_dtype=),
and ring-flash-attn (PyPI) running on our kernels through install(), on CPU processes with gloo."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys

import pytest
import torch
from conftest import assert_close_2x, device_for, randn, skip_unsupported

import fusedattn
from fusedattn import flash_attn_interface as fai
from fusedattn.reference import attention_ref, varlen_attention_ref


def _bhld(t):
    return t.transpose(1, 2)


def _ref_blhd(q, k, v, dtype=torch.float64, **kw):
    """The reference on (B, L, H, D) tensors in `dtype` (float64: ground truth; q's dtype: the baseline)."""
    out, lse = attention_ref(_bhld(q), _bhld(k), _bhld(v), compute_dtype=dtype, return_lse=True, **kw)
    return _bhld(out), lse


CASES = [
    dict(Lq=7, Lk=7, Hq=4, Hkv=4, causal=False, window=(-1, -1), softcap=0.0),
    dict(Lq=5, Lk=11, Hq=4, Hkv=2, causal=True, window=(-1, -1), softcap=0.0),  # bottom-right, GQA
    dict(Lq=9, Lk=9, Hq=2, Hkv=1, causal=False, window=(3, 1), softcap=0.0),
    dict(Lq=6, Lk=10, Hq=4, Hkv=2, causal=True, window=(2, -1), softcap=5.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"Lq{c['Lq']}-Lk{c['Lk']}-H{c['Hq']}x{c['Hkv']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attn_func_forward_backward(backend, case, dtype, gen):
    skip_unsupported("attention", backend, dtype=dtype, head_dim=16, softcap=case["softcap"])
    dev = device_for(backend)
    B, D = 2, 16
    q = randn(B, case["Lq"], case["Hq"], D, dtype=dtype, gen=gen, device=dev)
    k = randn(B, case["Lk"], case["Hkv"], D, dtype=dtype, gen=gen, device=dev)
    v = randn(B, case["Lk"], case["Hkv"], D, dtype=dtype, gen=gen, device=dev)
    dout = randn(B, case["Lq"], case["Hq"], D, dtype=dtype, gen=gen, device=dev)
    kw = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    fa_kw = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"])

    def run(fn, *x):
        x = [t.detach().requires_grad_() for t in x]
        out = fn(*x)
        return (out, *torch.autograd.grad(out, x, dout))

    ours = run(lambda q, k, v: fai.flash_attn_func(q, k, v, backend=backend, **fa_kw), q, k, v)
    ref = run(lambda q, k, v: _ref_blhd(q, k, v, **kw)[0], q.double(), k.double(), v.double())
    base = run(lambda q, k, v: _ref_blhd(q, k, v, dtype=dtype, **kw)[0], q, k, v)
    assert ours[0].shape == (B, case["Lq"], case["Hq"], D) and ours[0].is_contiguous()
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close_2x(ours[i], ref[i], base[i], factor=2 if i == 0 else 3, name=name)

    # the private pair (ring-flash-attn's), with the lse: (B, Hq, Lq) float32 natural log
    o, lse, s_dmask, rng = fai._flash_attn_forward(
        q, k, v, 0.0, None, case["causal"], *case["window"], case["softcap"], None, False, backend=backend
    )
    ref_lse = _ref_blhd(q.double(), k.double(), v.double(), **kw)[1]
    assert lse.dtype == torch.float32 and lse.shape == (B, case["Hq"], case["Lq"])
    assert_close_2x(lse, ref_lse.float(), _ref_blhd(q, k, v, dtype=torch.float32, **kw)[1], atol=1e-4, name="lse")
    assert s_dmask.numel() == 0 and rng.shape == (2,)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d = fai._flash_attn_backward(
        dout, q, k, v, o, lse, dq, dk, dv, 0.0, None, case["causal"], *case["window"], case["softcap"], None, False
    )
    assert d.shape == (B, case["Hq"], case["Lq"]) and d.dtype == torch.float32
    for got, i, name in ((dq, 1, "dq"), (dk, 2, "dk"), (dv, 3, "dv")):
        assert_close_2x(got, ref[i], base[i], factor=3, name=name)


def test_packed_variants_match_unpacked(backend, gen):
    skip_unsupported("attention", backend, dtype=torch.float32, head_dim=16)
    dev = device_for(backend)
    qkv = randn(2, 8, 3, 2, 16, gen=gen, device=dev, requires_grad=True)
    out = fai.flash_attn_qkvpacked_func(qkv, causal=True, backend=backend)
    ref = fai.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, backend=backend)
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    assert g.shape == qkv.shape and g.abs().sum() > 0
    q = randn(2, 5, 4, 16, gen=gen, device=dev)
    kv = randn(2, 9, 2, 2, 16, gen=gen, device=dev)
    torch.testing.assert_close(
        fai.flash_attn_kvpacked_func(q, kv, causal=True, backend=backend),
        fai.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True, backend=backend),
    )


def _varlen_inputs(gen, dev, dtype=torch.float32):
    lens_q, lens_k = [3, 0, 6, 5], [4, 2, 6, 9]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = randn(sum(lens_q), 4, 16, dtype=dtype, gen=gen, device=dev)
    k = randn(sum(lens_k), 2, 16, dtype=dtype, gen=gen, device=dev)
    v = randn(sum(lens_k), 2, 16, dtype=dtype, gen=gen, device=dev)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_private_pair_and_public(backend, causal, gen):
    skip_unsupported("varlen", backend, dtype=torch.float32, head_dim=16)
    dev = device_for(backend)
    q, k, v, cu_q, cu_k, mq, mk = _varlen_inputs(gen, dev)
    dout = randn(*q.shape, gen=gen, device=dev)
    o, lse, _, _ = fai._flash_attn_varlen_forward(
        q, k, v, cu_q, cu_k, mq, mk, 0.0, None, causal, -1, -1, 0.0, None, False, backend=backend
    )
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32

    def ref_fn(dtype):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = varlen_attention_ref(*x, cu_q, cu_k, mq, mk, causal=causal, compute_dtype=dtype)
        return (out, *torch.autograd.grad(out, x, dout.to(dtype)))

    ref, base = ref_fn(torch.float64), ref_fn(torch.float32)
    assert_close_2x(o, ref[0], base[0], name="out")
    public = fai.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend=backend)
    torch.testing.assert_close(public, o)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d = fai._flash_attn_varlen_backward(
        dout, q, k, v, o, lse, dq, dk, dv, cu_q, cu_k, mq, mk, 0.0, None, causal, -1, -1, 0.0, None, False
    )
    assert d.shape == (4, q.shape[0])
    for got, i, name in ((dq, 1, "dq"), (dk, 2, "dk"), (dv, 3, "dv")):
        assert_close_2x(got, ref[i], base[i], factor=3, name=name)
    kv = torch.stack([k, v], dim=1)
    torch.testing.assert_close(
        fai.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, mq, mk, causal=causal, backend=backend), o
    )


def test_varlen_qkvpacked(gen):
    q, _, _, cu_q, _, mq, _ = _varlen_inputs(gen, "cpu")
    qkv = torch.stack([q, q.flip(0), q * 0.5], dim=1)
    torch.testing.assert_close(
        fai.flash_attn_varlen_qkvpacked_func(qkv, cu_q, mq, causal=True),
        fai.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_q, cu_q, mq, mq, causal=True),
    )


def test_with_kvcache_appends_in_place(backend, gen):
    skip_unsupported("decode", backend, dtype=torch.float32, head_dim=16)
    dev = device_for(backend)
    B, Lmax, Hkv, Hq, D = 2, 12, 2, 4, 16
    k_cache = randn(B, Lmax, Hkv, D, gen=gen, device=dev)
    v_cache = randn(B, Lmax, Hkv, D, gen=gen, device=dev)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    q = randn(B, 2, Hq, D, gen=gen, device=dev)
    kn, vn = randn(B, 2, Hkv, D, gen=gen, device=dev), randn(B, 2, Hkv, D, gen=gen, device=dev)
    seqlens = torch.tensor([3, 7], dtype=torch.int32, device=dev)
    out, lse = fai.flash_attn_with_kvcache(
        q, k_cache, v_cache, kn, vn, cache_seqlens=seqlens, causal=True, return_softmax_lse=True, backend=backend
    )
    assert out.shape == (B, 2, Hq, D) and lse.shape == (B, Hq, 2)
    for b, n in enumerate((3, 7)):
        torch.testing.assert_close(k_cache[b, n : n + 2], kn[b])
        torch.testing.assert_close(v_cache[b, :n], vc0[b, :n])
        kk = torch.cat([kc0[b, :n], kn[b]])[None]
        vv = torch.cat([vc0[b, :n], vn[b]])[None]
        ref, ref_lse = _ref_blhd(q[b : b + 1].double(), kk.double(), vv.double(), causal=True)
        base, _ = _ref_blhd(q[b : b + 1], kk, vv, dtype=torch.float32, causal=True)
        assert_close_2x(out[b : b + 1], ref, base)
    # an int cache_seqlens means every sequence; None means the whole cache (no append)
    full = fai.flash_attn_with_kvcache(q, k_cache, v_cache, backend=backend)
    ref, _ = _ref_blhd(q.double(), k_cache.double(), v_cache.double())
    assert_close_2x(full, ref, _ref_blhd(q, k_cache, v_cache, dtype=torch.float32)[0])
    torch.testing.assert_close(
        fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=Lmax, backend=backend), full
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
def test_with_kvcache_rotary(causal, interleaved, gen):
    """flash-attn's rule: k rotated at cache_seqlens + i; q likewise when causal, else all at cache_seqlens;
    GPT-J pairs by default; then appended and attended as without rotary."""
    from fusedattn.reference import rotary_ref

    B, Lmax, Hkv, Hq, D, Lnew = 2, 12, 1, 2, 16, 2
    k_cache, v_cache = randn(B, Lmax, Hkv, D, gen=gen), randn(B, Lmax, Hkv, D, gen=gen)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    q, kn, vn = randn(B, Lnew, Hq, D, gen=gen), randn(B, Lnew, Hkv, D, gen=gen), randn(B, Lnew, Hkv, D, gen=gen)
    angle = torch.rand(Lmax, 4, generator=gen) * 6.3  # rotary_dim 8 of 16
    cos, sin = angle.cos(), angle.sin()
    lens = (3, 7)
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=torch.tensor(lens, dtype=torch.int32), causal=causal)
    if not interleaved:
        kw["rotary_interleaved"] = False
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, kn, vn, backend="cpu", **kw)
    for b, n in enumerate(lens):
        k_ro = rotary_ref(kn[b], cos, sin, n, interleaved=interleaved)
        q_ro = rotary_ref(q[b], cos, sin, n, interleaved=interleaved, same_position=not causal)
        torch.testing.assert_close(k_cache[b, n : n + Lnew], k_ro)
        kk, vv = torch.cat([kc0[b, :n], k_ro])[None], torch.cat([vc0[b, :n], vn[b]])[None]
        ref, _ = _ref_blhd(q_ro[None].double(), kk.double(), vv.double(), causal=causal)
        base, _ = _ref_blhd(q_ro[None], kk, vv, dtype=torch.float32, causal=causal)
        assert_close_2x(out[b : b + 1], ref, base)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda q: fai.flash_attn_func(q, q, q, dropout_p=0.1), "dropout_p"),
        (lambda q: fai.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2)), "alibi_slopes"),
        (lambda q: fai.flash_attn_func(q, q, q, return_attn_probs=True), "return_attn_probs"),
        (lambda q: fai._flash_attn_forward(q, q, q, 0.0, None, False, -1, -1, 0.0, None, True), "return_softmax"),
    ],
)
def test_unsupported_arguments_raise_naming_them(call, name):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(NotImplementedError, match=name):
        call(q)


def test_install_is_opt_in_and_undone():
    had = sys.modules.get("flash_attn")
    assert had is None or not getattr(had, "__fusedattn__", False), "importing fusedattn must not patch flash_attn"
    try:
        with pytest.warns(UserWarning, match="now resolves to fusedattn.flash_attn_interface"):
            fai.install()
        import flash_attn
        from flash_attn.flash_attn_interface import _flash_attn_forward

        assert flash_attn.__version__ == fai.FLASH_ATTN_VERSION and flash_attn.flash_attn_func is fai.flash_attn_func
        assert _flash_attn_forward is fai._flash_attn_forward and fai.installed()
    finally:
        fai.uninstall()
    assert sys.modules.get("flash_attn") is had and not fai.installed()


# ------------------------------------------------------------------------------------------------
# the backward op
# ------------------------------------------------------------------------------------------------
def _backward_args(gen, dev, layout, dtype=torch.float32):
    q = randn(2, 4, 6, 16, dtype=dtype, gen=gen, device=dev)  # (B, H, L, D)
    k = randn(2, 2, 9, 16, dtype=dtype, gen=gen, device=dev)
    v = randn(2, 2, 9, 16, dtype=dtype, gen=gen, device=dev)
    out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    dout = randn(*out.shape, dtype=dtype, gen=gen, device=dev)
    t = (dout, q, k, v, out)
    if layout == "blhd":
        t = tuple(_bhld(x).contiguous() for x in t)
    dq, dk, dv = (torch.empty_like(x) for x in t[1:4])
    return (*t, lse, dq, dk, dv, 0.25, -1, 0, True, 0.0, layout)


@pytest.mark.parametrize("layout", ["blhd", "bhld"])
def test_backward_op_opcheck_and_values(backend, layout, gen):
    skip_unsupported("attention", backend, dtype=torch.float32, head_dim=16)
    args = _backward_args(gen, device_for(backend), layout)
    torch.library.opcheck(torch.ops.fusedattn.attention_backward, (*args, backend))
    torch.ops.fusedattn.attention_backward(*args, backend)
    got = [t.clone() for t in args[6:9]]
    torch.ops.fusedattn.attention_backward(*args[:6], *(torch.empty_like(t) for t in got), *args[9:], "reference")
    ref = list(args[6:9])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True])
def test_backward_op_compiles_fullgraph(dynamic, gen):
    args = _backward_args(gen, "cpu", "blhd")

    def f(*a):
        torch.ops.fusedattn.attention_backward(*a, "cpu")
        return a[6] * 1.0, a[7] * 1.0, a[8] * 1.0

    eager = [t.clone() for t in f(*args)]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)(*args)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_backward_op_bad_inputs_name_the_argument(gen):
    args = list(_backward_args(gen, "cpu", "blhd"))
    bad = list(args)
    bad[6] = bad[6][:, :3]
    with pytest.raises(ValueError, match="dq"):
        torch.ops.fusedattn.attention_backward(*bad, "cpu")
    bad = list(args)
    bad[5] = bad[5].double()
    with pytest.raises(ValueError, match="lse"):
        torch.ops.fusedattn.attention_backward(*bad, "cpu")
    with pytest.raises(ValueError, match="layout"):
        torch.ops.fusedattn.attention_backward(*args[:-1], "lbhd", "cpu")


def test_varlen_backward_op_opcheck(gen):
    q, k, v, cu_q, cu_k, mq, mk = _varlen_inputs(gen, "cpu")
    out, lse = fusedattn.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True)
    dout = torch.randn_like(out)
    args = (dout, q, k, v, out, lse, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    args += (cu_q, cu_k, mq, mk, 0.25, -1, 0, 0.0, "cpu")
    torch.library.opcheck(torch.ops.fusedattn.varlen_attention_backward, args)


# ------------------------------------------------------------------------------------------------
# merge_attention_states(layout=, out_dtype=)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_merge_of_attention_halves_is_attention_over_the_union(backend, causal, gen):
    skip_unsupported("merge", backend, dtype=torch.float32, head_dim=16)
    skip_unsupported("attention", backend, dtype=torch.float32, head_dim=16)
    dev = device_for(backend)
    q = randn(2, 4, 5, 16, gen=gen, device=dev)
    k = randn(2, 2, 12, 16, gen=gen, device=dev)
    v = randn(2, 2, 12, 16, gen=gen, device=dev)
    # causal over the union (bottom-right): the first 7 keys are all visible to every query, the last 5 causal
    k1, k2, v1, v2 = k[:, :, :7], k[:, :, 7:], v[:, :, :7], v[:, :, 7:]
    a = fusedattn.attention(q, k1, v1, return_lse=True, backend=backend)
    b = fusedattn.attention(q, k2, v2, causal=causal, return_lse=True, backend=backend)
    out, lse = fusedattn.merge_attention_states(*a, *b, layout="bhld", backend=backend)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=causal, return_lse=True)
    base, _ = attention_ref(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape
    assert_close_2x(out, ref, base)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)
    # fp32 partial output from bf16 blocks
    a16, b16 = (a[0].bfloat16(), a[1]), (b[0].bfloat16(), b[1])
    o32, _ = fusedattn.merge_attention_states(*a16, *b16, layout="bhld", out_dtype=torch.float32, backend=backend)
    assert o32.dtype == torch.float32
    o16, _ = fusedattn.merge_attention_states(*a16, *b16, layout="bhld", backend=backend)
    assert o16.dtype == torch.bfloat16
    assert (o32 - ref).abs().max() <= (o16.float() - ref).abs().max()


def test_merge_layout_is_explicit(gen):
    a = fusedattn.attention(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8), return_lse=True)
    with pytest.raises(ValueError, match="layout"):
        fusedattn.merge_attention_states(*a, *a, layout="auto")
    with pytest.raises(ValueError, match="out_dtype"):
        fusedattn.merge_attention_states(*a, *a, layout="bhld", out_dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# ring-flash-attn (PyPI) on our kernels, gloo on CPU processes
# ------------------------------------------------------------------------------------------------
HAVE_RING = importlib.util.find_spec("ring_flash_attn") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_ring_functions():
    """ring-flash-attn's ring and zigzag functions. Its package __init__ also imports its Hugging Face adapter, which
    needs transformers < 5 (is_flash_attn_greater_or_equal_2_10); that adapter is not under test, so the package is
    entered without running its __init__ (an empty package module with its real __path__; nothing is patched)."""
    import types

    spec = importlib.util.find_spec("ring_flash_attn")
    if "ring_flash_attn" not in sys.modules:
        pkg = types.ModuleType("ring_flash_attn")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["ring_flash_attn"] = pkg
    from ring_flash_attn.ring_flash_attn import ring_flash_attn_func
    from ring_flash_attn.zigzag_ring_flash_attn import zigzag_ring_flash_attn_func

    return ring_flash_attn_func, zigzag_ring_flash_attn_func


def _ring_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fai.install()
        ring_flash_attn_func, zigzag_ring_flash_attn_func = _import_ring_functions()

        B, L, Hq, Hkv, D = 1, 8 * world, 4, 2, 16
        g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
        q, k, v, dout = (torch.randn(B, L, h, D, generator=g) for h in (Hq, Hkv, Hkv, Hq))
        chunk = L // world
        zig = 2 * world
        zig_idx = [rank, zig - 1 - rank]

        def shard(t, kind):
            if kind == "ring":
                return t[:, rank * chunk : (rank + 1) * chunk]
            return torch.cat([t.chunk(zig, dim=1)[i] for i in zig_idx], dim=1)

        for kind, causal, fn in (
            ("ring", False, ring_flash_attn_func),
            ("ring", True, ring_flash_attn_func),
            ("zigzag", True, zigzag_ring_flash_attn_func),
        ):
            x = [shard(t, kind).bfloat16().requires_grad_() for t in (q, k, v)]
            out = fn(*x, causal=causal)
            grads = torch.autograd.grad(out, x, shard(dout, kind).bfloat16())

            def full(dtype):
                y = [t.to(dtype).requires_grad_() for t in (q, k, v)]
                o = _ref_blhd(*y, dtype=dtype, causal=causal)[0]
                return (o, *torch.autograd.grad(o, y, dout.to(dtype)))

            ref, base = full(torch.float64), full(torch.bfloat16)
            for i, (got, name) in enumerate(zip((out, *grads), ("out", "dq", "dk", "dv"))):
                assert_close_2x(
                    got,
                    shard(ref[i], kind),
                    shard(base[i], kind),
                    factor=2 if i == 0 else 3,
                    name=f"{kind} causal={causal} rank {rank}/{world} {name}",
                )
    finally:
        fai.uninstall()
        dist.destroy_process_group()


@pytest.mark.skipif(
    not HAVE_RING, reason="ring-flash-attn is not installed (pip install --no-deps ring-flash-attn==0.1.8)"
)
@pytest.mark.parametrize("world", [2, 4])
def test_ring_flash_attn_runs_on_fusedattn(world):
    import torch.multiprocessing as mp

    mp.spawn(_ring_worker, args=(world, _free_port()), nprocs=world, join=True)
