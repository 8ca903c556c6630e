"""What only the hand-written CUDA kernels (csrc/cuda) have: large shapes, the copy of inputs cp.async cannot read
(strided, misaligned), deterministic backward, the cases they do not cover (named in the error, "auto" falling back)
and the public functions' routing to them. Runs on a GPU machine with a CUDA build of fusedattn; skips elsewhere.

Their grid cases run in the shared grids, on every backend: tests/test_attention.py (FLASH_GRID: windows at their
dtypes and head dims, lengths that cross every tile edge) and tests/test_decode.py (HALF_GRID and the decode
edge cases; unused cache slots hold NaN and block-table entries past a sequence's last page are out of range, so a
read past the end shows up as NaN or a crash, run under compute-sanitizer by benchmarks/gpu_session.sh).
The reference runs in float64 on the same device; the baseline is the same math in the input dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_2x, case_id, device_for, grads, max_abs_err, randn, unavailable_reason
from fusedattn.reference import attention_ref

CUDA_REASON = unavailable_reason("cuda")
pytestmark = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend: {CUDA_REASON}")

DEV = device_for("cuda")
fwd_op = torch.ops.fusedattn.attention_fwd
bwd_op = torch.ops.fusedattn.attention_bwd
decode_op = torch.ops.fusedattn.decode_fwd

B = 2
HEADS = {"mha": (2, 2), "gqa": (8, 2), "mqa": (4, 1)}  # name -> (Hq, Hkv)
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
    return dict(
        causal=causal != "none",
        causal_align="top_left" if causal == "top_left" else "bottom_right",
        window=window,
        scale=scale,
    )


def check_forward(q, k, v, causal="none", window=(-1, -1), scale=None):
    out, lse = run_kernel(q, k, v, causal=causal, window=window, scale=scale)
    kw = ref_kwargs(causal, window, scale)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), return_lse=True, compute_dtype=torch.float64, **kw)
    base, base_lse = attention_ref(q, k, v, return_lse=True, compute_dtype=q.dtype, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close_2x(out, ref, base)
    assert_close_2x(lse, ref_lse, base_lse, name="lse")
    return out, lse


def check_backward(q, k, v, gen, causal="none", window=(-1, -1), use_lse=False, scale=None):
    Bq, Hq, Lq, D = q.shape
    g_out = randn(Bq, Hq, Lq, D, dtype=q.dtype, gen=gen).to(DEV)
    g_lse = randn(Bq, Hq, Lq, gen=gen).to(DEV) if use_lse else None
    kw = ref_kwargs(causal, window, scale)
    ref = grads(
        lambda *x: attention_ref(*x, return_lse=True, compute_dtype=torch.float64, **kw),
        [q.double(), k.double(), v.double()],
        g_out.double(),
        None if g_lse is None else g_lse.double(),
    )
    base = grads(lambda *x: attention_ref(*x, return_lse=True, compute_dtype=q.dtype, **kw), [q, k, v], g_out, g_lse)
    got = grads(lambda *x: run_kernel(*x, causal=causal, window=window, scale=scale), [q, k, v], g_out, g_lse)
    for name, g, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert g.shape == r.shape and g.dtype == q.dtype, name
        assert not g.isnan().any(), f"{name} has NaN"
        floor = 1e-5 * max(r.abs().max().item(), 1.0)
        assert_close_2x(g, r, b, factor=3, atol=floor, name=name)


# ---------------------------------------------------------------------------------------------- large shapes


@pytest.mark.parametrize("case", LONG, ids=case_id)
def test_long(case, gen):
    q, k, v = make_qkv(gen, case, B=1)
    check_forward(q, k, v, causal=case["causal"], window=case["window"])
    check_backward(q, k, v, gen, causal=case["causal"], window=case["window"])


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
    case = dict(
        dtype=torch.bfloat16, causal="bottom_right", head_dim=128, lens=(300, 400), heads="gqa", window=(-1, -1)
    )
    q, k, v = make_qkv(gen, case)
    g = randn(B, 8, 300, 128, dtype=torch.bfloat16, gen=gen).to(DEV)
    a = grads(lambda *x: run_kernel(*x, causal="bottom_right"), [q, k, v], g)
    b = grads(lambda *x: run_kernel(*x, causal="bottom_right"), [q, k, v], g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("what", ["fp32", "head_dim", "dv", "mask", "softcap"])
def test_unsupported_cases_name_the_case(gen, what):
    dt = torch.float32 if what == "fp32" else torch.bfloat16
    D = 80 if what == "head_dim" else 64
    q, k = (randn(1, 2, 9, D, dtype=dt, gen=gen).to(DEV) for _ in range(2))
    v = randn(1, 2, 9, 128 if what == "dv" else D, dtype=dt, gen=gen).to(DEV)
    mask = torch.zeros(9, 9, device=DEV).expand(1, 2, 9, 9) if what == "mask" else None
    softcap = 5.0 if what == "softcap" else 0.0
    match = {
        "fp32": "float16 and bfloat16",
        "head_dim": "head dims 64, 128 and 256",
        "dv": "value head dim",
        "mask": "attn_mask",
        "softcap": "softcap",
    }[what]
    with pytest.raises(RuntimeError, match=match):
        fwd_op(q, k, v, mask, 0.125, -1, -1, True, softcap)


# ---------------------------------------------------------------------------------------------- decode


def _decode_batch(gen, lengths, **kw):
    from test_decode import make_batch  # NaN-filled unused slots, out-of-range unused block-table entries

    return make_batch(gen, lengths, **kw)


def _to(inputs, device):
    return {n: (t.to(device) if t is not None else None) for n, t in inputs.items()}


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
        out = fusedattn.decode_attention(
            x["q"],
            x["k_cache"].clone(),
            x["v_cache"].clone(),
            cache_seqlens=x["cache_seqlens"],
            k_new=x["k_new"],
            v_new=x["v_new"],
            block_table=x["block_table"],
            num_splits=2,
            backend="cuda",
        )
        raw, _ = decode_op(
            x["q"],
            x["k_cache"].clone(),
            x["v_cache"].clone(),
            x["cache_seqlens"],
            x["k_new"],
            x["v_new"],
            x["block_table"],
            None,
            64**-0.5,
            -1,
            0,
            0.0,
            2,
        )
        torch.testing.assert_close(out, raw, atol=0, rtol=0)
        y = _to(_decode_batch(gen, [5, 30], Lq=1, Hq=4, Hkv=2, D=32, dtype=torch.float32, page=16), DEV)
        with pytest.warns(UserWarning, match="cuda: dtype torch.float32"):
            fusedattn.decode_attention(
                y["q"], y["k_cache"], y["v_cache"], cache_seqlens=y["cache_seqlens"], block_table=y["block_table"]
            )
