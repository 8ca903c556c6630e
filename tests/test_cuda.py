"""The hand-written CUDA kernels (csrc/cuda, torch.ops.fusedattn.* on CUDA tensors) against the reference under
FlashAttention's 2x rule (3x for gradients). Runs on a GPU machine with a CUDA build of fusedattn; skips elsewhere.

The grids are pairwise over dtype x causal (none / top-left / bottom-right) x head dim x (Lq, Lk) x GQA x window;
lengths are odd and unequal so that every tile edge (64-row query blocks, 32/64-key tiles) is crossed, and
Lq > Lk with bottom-right causal gives rows that see no key (out 0, lse -inf, zero gradient). The reference runs
in float64 on the same device; the baseline is the same math in the input dtype.
Decode reuses tests/test_decode.py's batches: unused cache slots hold NaN and block-table entries past a sequence's
last page are out of range, so a read past the end shows up as NaN or a crash (run under compute-sanitizer by
benchmarks/gpu_session.sh).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_2x, case_id, max_abs_err, pairwise, randn
from fusedattn import _ops
from fusedattn.reference import attention_ref, decode_attention_ref, merge_attention_states_ref

HAS_CUDA_KERNELS = torch.cuda.is_available() and _ops._C is not None and bool(_ops.build_info().get("cuda", False))
pytestmark = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA device and fusedattn built with CUDA")

DEV = "cuda"
fwd_op = torch.ops.fusedattn.attention_fwd
bwd_op = torch.ops.fusedattn.attention_bwd
decode_op = torch.ops.fusedattn.decode_fwd
merge_op = torch.ops.fusedattn.merge_attention_states

B = 2
HEADS = {"mha": (2, 2), "gqa": (8, 2), "mqa": (4, 1)}  # name -> (Hq, Hkv)
LENGTHS = [(1, 1), (1, 97), (17, 17), (17, 257), (97, 17), (97, 97), (257, 1), (257, 97), (257, 257), (130, 511)]
GRID = pairwise({
    "dtype": [torch.bfloat16, torch.float16],
    "causal": ["none", "top_left", "bottom_right"],
    "head_dim": [64, 128, 256],
    "lens": LENGTHS,
    "heads": ["mha", "gqa", "mqa"],
    "window": [(-1, -1), (40, -1), (7, 21)],
})
LONG = [
    dict(dtype=torch.bfloat16, causal="bottom_right", head_dim=128, lens=(1025, 1025), heads="gqa", window=(-1, -1)),
    dict(dtype=torch.float16, causal="top_left", head_dim=64, lens=(1025, 2049), heads="mqa", window=(-1, -1)),
    dict(dtype=torch.bfloat16, causal="none", head_dim=256, lens=(777, 1111), heads="mha", window=(300, 5)),
]


# ---------------------------------------------------------------------------------------------- helpers


def make_qkv(gen, case, B=B):
    Hq, Hkv = HEADS[case["heads"]]
    (Lq, Lk), D, dt = case["lens"], case["head_dim"], case["dtype"]
    q = randn(B, Hq, Lq, D, dtype=dt, gen=gen).to(DEV)
    k = randn(B, Hkv, Lk, D, dtype=dt, gen=gen).to(DEV)
    v = randn(B, Hkv, Lk, D, dtype=dt, gen=gen).to(DEV)
    return q, k, v


def window_args(causal, window):
    """(window_left, window_right, bottom_right) of the raw op for a causal mode and a window."""
    left, right = window
    if causal != "none":
        right = 0
    return left, right, causal != "top_left"


def run_kernel(q, k, v, *, causal="none", window=(-1, -1), scale=None):
    left, right, bottom_right = window_args(causal, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return fwd_op(q, k, v, None, scale, left, right, bottom_right, 0.0)


def ref_kwargs(causal, window, scale=None):
    return dict(causal=causal != "none", causal_align="top_left" if causal == "top_left" else "bottom_right",
                window=window, scale=scale)


def check_forward(q, k, v, causal="none", window=(-1, -1), scale=None):
    out, lse = run_kernel(q, k, v, causal=causal, window=window, scale=scale)
    kw = ref_kwargs(causal, window, scale)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), return_lse=True, compute_dtype=torch.float64,
                                 **kw)
    base, base_lse = attention_ref(q, k, v, return_lse=True, compute_dtype=q.dtype, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close_2x(out, ref, base)
    assert_close_2x(lse, ref_lse, base_lse, name="lse")
    return out, lse


def grads(fn, inputs, g_out, g_lse=None):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out, lse = fn(*inputs)
    outputs, cotangents = [out], [g_out.to(out.dtype)]
    if g_lse is not None:
        outputs.append(lse)
        cotangents.append(g_lse.to(lse.dtype))
    return torch.autograd.grad(outputs, inputs, cotangents)


def check_backward(q, k, v, gen, causal="none", window=(-1, -1), use_lse=False, scale=None):
    Bq, Hq, Lq, D = q.shape
    g_out = randn(Bq, Hq, Lq, D, dtype=q.dtype, gen=gen).to(DEV)
    g_lse = randn(Bq, Hq, Lq, gen=gen).to(DEV) if use_lse else None
    kw = ref_kwargs(causal, window, scale)
    ref = grads(lambda *x: attention_ref(*x, return_lse=True, compute_dtype=torch.float64, **kw),
                [q.double(), k.double(), v.double()], g_out.double(), None if g_lse is None else g_lse.double())
    base = grads(lambda *x: attention_ref(*x, return_lse=True, compute_dtype=q.dtype, **kw), [q, k, v], g_out, g_lse)
    got = grads(lambda *x: run_kernel(*x, causal=causal, window=window, scale=scale), [q, k, v], g_out, g_lse)
    for name, g, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert g.shape == r.shape and g.dtype == q.dtype, name
        assert not g.isnan().any(), f"{name} has NaN"
        floor = 1e-5 * max(r.abs().max().item(), 1.0)
        assert_close_2x(g, r, b, factor=3, atol=floor, name=name)


# ---------------------------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_forward(case, gen):
    q, k, v = make_qkv(gen, case)
    check_forward(q, k, v, causal=case["causal"], window=case["window"])


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_backward(case, gen):
    q, k, v = make_qkv(gen, case)
    check_backward(q, k, v, gen, causal=case["causal"], window=case["window"], use_lse=case["lens"][0] % 2 == 1)


@pytest.mark.parametrize("case", LONG, ids=case_id)
def test_long(case, gen):
    q, k, v = make_qkv(gen, case, B=1)
    check_forward(q, k, v, causal=case["causal"], window=case["window"])
    check_backward(q, k, v, gen, causal=case["causal"], window=case["window"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_masked_rows_are_zero(gen, dtype):
    """Bottom-right causal with Lq > Lk: the first Lq - Lk rows see no key -> out 0, lse -inf, zero gradients."""
    q = randn(1, 4, 150, 64, dtype=dtype, gen=gen).to(DEV)
    k, v = (randn(1, 2, 20, 64, dtype=dtype, gen=gen).to(DEV) for _ in range(2))
    out, lse = check_forward(q, k, v, causal="bottom_right")
    assert (out[:, :, :130] == 0).all() and (lse[:, :, :130] == -math.inf).all()
    assert (lse[:, :, 130:] > -math.inf).all()
    dq, dk, dv = grads(lambda *x: run_kernel(*x, causal="bottom_right"), [q, k, v],
                       randn(1, 4, 150, 64, dtype=dtype, gen=gen).to(DEV))
    assert (dq[:, :, :130] == 0).all() and not dq.isnan().any()
    check_backward(q, k, v, gen, causal="bottom_right")


def test_window_that_hides_some_rows(gen):
    """Window (0, 0) around the bottom-right diagonal with Lq > Lk: query i sees only key i - 20, so the first 20
    rows see nothing; then a wider window, with a scale other than 1/sqrt(D)."""
    q = randn(2, 2, 90, 128, dtype=torch.bfloat16, gen=gen).to(DEV)
    k, v = (randn(2, 2, 70, 128, dtype=torch.bfloat16, gen=gen).to(DEV) for _ in range(2))
    out, lse = run_kernel(q, k, v, causal="none", window=(0, 0), scale=0.3)
    kw = ref_kwargs("none", (0, 0), 0.3)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), return_lse=True, compute_dtype=torch.float64,
                                 **kw)
    assert (lse == -math.inf).any() and not out.isnan().any()
    assert max_abs_err(lse, ref_lse) < 1e-2
    check_forward(q, k, v, causal="none", window=(3, 2), scale=0.3)
    check_backward(q, k, v, gen, causal="none", window=(3, 2), scale=0.3)


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_strided_and_misaligned_inputs(gen, causal):
    """(B, L, H, D) storage viewed as (B, H, L, D), and a view starting 1 element in (not 16-byte aligned): the
    binding copies what cp.async cannot read and the numbers match contiguous inputs exactly."""
    q = randn(B, 45, 4, 64, dtype=torch.float16, gen=gen).to(DEV).transpose(1, 2)
    k = randn(B, 77, 2, 64, dtype=torch.float16, gen=gen).to(DEV).transpose(1, 2)
    flat = randn(B * 2 * 77 * 64 + 1, dtype=torch.float16, gen=gen).to(DEV)
    v = flat[1:].view(B, 2, 77, 64)
    check_forward(q, k, v, causal=causal)
    check_backward(q, k, v, gen, causal=causal)
    out = run_kernel(q, k, v, causal=causal)[0]
    out_c = run_kernel(q.contiguous(), k.contiguous(), v.clone(), causal=causal)[0]
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)


def test_public_api_routes_to_cuda(gen):
    q, k, v = (randn(1, 4, 33, 64, dtype=torch.bfloat16, gen=gen).to(DEV) for _ in range(3))
    import fusedattn
    out = fusedattn.attention(q, k, v, causal=True, backend="cuda")
    torch.testing.assert_close(out, run_kernel(q, k, v, causal="bottom_right")[0], atol=0, rtol=0)


def test_deterministic_backward(gen):
    """No atomics: two backward passes give bit-identical gradients."""
    case = dict(dtype=torch.bfloat16, causal="bottom_right", head_dim=128, lens=(300, 400), heads="gqa",
                window=(-1, -1))
    q, k, v = make_qkv(gen, case)
    g = randn(B, 8, 300, 128, dtype=torch.bfloat16, gen=gen).to(DEV)
    a = grads(lambda *x: run_kernel(*x, causal="bottom_right"), [q, k, v], g)
    b = grads(lambda *x: run_kernel(*x, causal="bottom_right"), [q, k, v], g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_opcheck(gen):
    q, k, v = (randn(1, 2, 37, 64, dtype=torch.bfloat16, gen=gen).to(DEV) for _ in range(3))
    torch.library.opcheck(fwd_op, (q, k, v, None, 0.125, -1, 0, True, 0.0))
    out, lse = fwd_op(q, k, v, None, 0.125, -1, 0, True, 0.0)
    torch.library.opcheck(bwd_op, (torch.randn_like(out), q, k, v, out, lse, None, 0.125, -1, 0, True, 0.0, None))


def test_torch_compile_fullgraph(gen):
    q, k, v = (randn(1, 2, 50, 64, dtype=torch.float16, gen=gen).to(DEV) for _ in range(3))

    def f(q, k, v):
        return fwd_op(q, k, v, None, 0.125, -1, 0, True, 0.0)[0]

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v), atol=0, rtol=0)


@pytest.mark.parametrize("what", ["fp32", "head_dim", "dv", "mask", "softcap"])
def test_unsupported_cases_name_the_case(gen, what):
    dt = torch.float32 if what == "fp32" else torch.bfloat16
    D = 80 if what == "head_dim" else 64
    q, k = (randn(1, 2, 9, D, dtype=dt, gen=gen).to(DEV) for _ in range(2))
    v = randn(1, 2, 9, 128 if what == "dv" else D, dtype=dt, gen=gen).to(DEV)
    mask = torch.zeros(9, 9, device=DEV).expand(1, 2, 9, 9) if what == "mask" else None
    softcap = 5.0 if what == "softcap" else 0.0
    match = {"fp32": "float16 and bfloat16", "head_dim": "head dims 64, 128 and 256", "dv": "value head dim",
             "mask": "attn_mask", "softcap": "softcap"}[what]
    with pytest.raises(RuntimeError, match=match):
        fwd_op(q, k, v, mask, 0.125, -1, -1, True, softcap)


# ---------------------------------------------------------------------------------------------- decode


def _decode_batch(gen, lengths, **kw):
    from test_decode import make_batch  # NaN-filled unused slots, out-of-range unused block-table entries
    return make_batch(gen, lengths, **kw)


def _to(inputs, device):
    return {n: (t.to(device) if t is not None else None) for n, t in inputs.items()}


def check_decode(inputs, *, num_splits=0, causal=True, window=(-1, -1), softcap=0.0, scale=None):
    cpu = {n: (t.clone() if t is not None else None) for n, t in inputs.items()}
    x = _to(cpu, DEV)
    D = x["q"].shape[-1]
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    left, right = window
    out, lse = decode_op(x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"], x["k_new"], x["v_new"],
                         x["block_table"], x.get("cache_batch_idx"), sc, left, 0 if causal else right, softcap,
                         num_splits)
    kw = dict(cache_seqlens=cpu["cache_seqlens"], block_table=cpu["block_table"],
              cache_batch_idx=cpu.get("cache_batch_idx"), causal=causal, window=window, softcap=softcap, scale=sc,
              return_lse=True)

    def ref_run(dtype):
        y = {n: (t.clone() if t is not None else None) for n, t in cpu.items()}
        if dtype == torch.float64:
            y = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in y.items()}
        res = decode_attention_ref(y["q"], y["k_cache"], y["v_cache"], k_new=y["k_new"], v_new=y["v_new"],
                                   compute_dtype=dtype, **kw)
        return res, y

    (ref, ref_lse), _ = ref_run(torch.float64)
    (base, base_lse), y = ref_run(inputs["q"].dtype)
    assert out.shape == ref.shape and out.dtype == inputs["q"].dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_close_2x(out, ref, base)
    assert_close_2x(lse, ref_lse, base_lse, name="lse")
    # the in-place append wrote exactly the reference's rows (NaN = untouched slots on both sides)
    assert max_abs_err(x["k_cache"], y["k_cache"]) == 0 and max_abs_err(x["v_cache"], y["v_cache"]) == 0
    return out, lse


DECODE_LENGTHS = [1, 7, 255, 256, 257, 4097]
DECODE_GRID = pairwise({
    "dtype": [torch.bfloat16, torch.float16],
    "page": [None, 1, 16, 64, 256],
    "Lq": [1, 4],
    "gqa": [1, 4, 8],
    "D": [64, 128, 256],
    "splits": [1, 2, 7, 0],
    "Lnew": [0, 3],
})


@pytest.mark.parametrize("case", DECODE_GRID, ids=case_id)
def test_decode(case, gen):
    inputs = _decode_batch(gen, DECODE_LENGTHS, Lq=case["Lq"], Hq=2 * case["gqa"], Hkv=2, D=case["D"],
                           dtype=case["dtype"], page=case["page"], Lnew=case["Lnew"])
    check_decode(inputs, num_splits=case["splits"])


@pytest.mark.parametrize("case", pairwise({
    "window": [(16, 0), (0, 0), (100, -1), (-1, 2)],
    "causal": [True, False],
    "page": [None, 16],
    "softcap": [0.0, 5.0],
}), ids=case_id)
def test_decode_window_softcap(case, gen):
    inputs = _decode_batch(gen, [3, 40, 300], Lq=4, Hq=8, Hkv=2, D=64, dtype=torch.bfloat16, page=case["page"],
                           Lnew=2)
    inputs["q"] = inputs["q"] * 3
    check_decode(inputs, causal=case["causal"], window=case["window"], softcap=case["softcap"], scale=0.2,
                 num_splits=3)


def test_decode_many_rows_per_kv_head(gen):
    """Lq x group = 5 x 8 = 40 query rows per kv head: more than one CTA's worth (DECODE_ROWS_PER_CTA = 32)."""
    inputs = _decode_batch(gen, [1, 100, 700], Lq=5, Hq=16, Hkv=2, D=128, dtype=torch.float16, page=32, Lnew=5)
    check_decode(inputs, num_splits=2)


def test_decode_cache_batch_idx(gen):
    inputs = _decode_batch(gen, [9, 33, 20, 50], Lq=2, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16, Lnew=2)
    rows = torch.tensor([4, 0, 5, 2], dtype=torch.int32)
    for name in ("k_cache", "v_cache"):
        big = torch.full((6,) + inputs[name].shape[1:], math.nan, dtype=inputs[name].dtype)
        big[rows.long()] = inputs[name]
        inputs[name] = big
    inputs["cache_batch_idx"] = rows
    check_decode(inputs, num_splits=2)


def test_decode_empty_sequence_gives_zero(gen):
    inputs = _decode_batch(gen, [0, 5], Lq=1, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16, page=16)
    out, lse = check_decode(inputs, num_splits=2)
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_attention_states(gen, dtype):
    Bm, L, H, D = 2, 5, 3, 64
    oa, ob = (randn(Bm, L, H, D, dtype=dtype, gen=gen).to(DEV) for _ in range(2))
    la, lb = (randn(Bm, H, L, gen=gen).to(DEV) for _ in range(2))
    la[0, 0, 0] = -math.inf  # one side empty
    la[1, 1, 1] = lb[1, 1, 1] = -math.inf  # both empty
    oa[1, 1, 1] = math.nan  # never read: its weight is 0
    out, lse = merge_op(oa, la, ob, lb)
    ref, ref_lse = merge_attention_states_ref(oa.double(), la.double(), ob.double(), lb.double(),
                                              compute_dtype=torch.float64)
    base, base_lse = merge_attention_states_ref(oa, la, ob, lb, compute_dtype=torch.float32)
    assert_close_2x(out, ref, base)
    assert_close_2x(lse, ref_lse, base_lse)
    assert (out[1, 1, 1] == 0).all() and lse[1, 1, 1] == -math.inf


def test_auto_falls_back_for_cases_the_cuda_kernels_do_not_cover(gen):
    """float32 / head dim 80 / a mask: "auto" warns and uses another backend; backend="cuda" raises naming the case."""
    import fusedattn
    q, k, v = (randn(1, 2, 20, 80, gen=gen).to(DEV) for _ in range(3))
    with pytest.warns(UserWarning, match="cuda: dtype torch.float32"):
        out = fusedattn.attention(q, k, v, causal=True)
    ref = attention_ref(q.double(), k.double(), v.double(), causal=True)
    assert max_abs_err(out, ref) < 1e-4
    with pytest.raises(RuntimeError, match="does not cover this case: dtype"):
        fusedattn.attention(q, k, v, backend="cuda")


def test_decode_public_api_routes_to_cuda_and_falls_back(gen):
    import fusedattn
    inputs = _decode_batch(gen, [5, 300], Lq=1, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16, page=16, Lnew=1)
    x = _to(inputs, DEV)
    with torch.no_grad():
        out = fusedattn.decode_attention(x["q"], x["k_cache"].clone(), x["v_cache"].clone(),
                                         cache_seqlens=x["cache_seqlens"], k_new=x["k_new"], v_new=x["v_new"],
                                         block_table=x["block_table"], num_splits=2, backend="cuda")
        raw, _ = decode_op(x["q"], x["k_cache"].clone(), x["v_cache"].clone(), x["cache_seqlens"], x["k_new"],
                           x["v_new"], x["block_table"], None, 64 ** -0.5, -1, 0, 0.0, 2)
        torch.testing.assert_close(out, raw, atol=0, rtol=0)
        y = _to(_decode_batch(gen, [5, 30], Lq=1, Hq=4, Hkv=2, D=32, dtype=torch.float32, page=16), DEV)
        with pytest.warns(UserWarning, match="cuda: dtype torch.float32"):
            fusedattn.decode_attention(y["q"], y["k_cache"], y["v_cache"], cache_seqlens=y["cache_seqlens"],
                                       block_table=y["block_table"])
