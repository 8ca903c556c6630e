"""Fused attention kernels (fusedattn.attention(backend=...) and the raw torch.ops.fusedattn ops) against the
reference under FlashAttention's 2x rule (3x for gradients), on every backend of tests/conftest.py: "cpu" (C++),
"triton" (on a GPU when there is one, else on the CPU through TRITON_INTERPRET=1), "cuda" (csrc/cuda) and
"reference"; a case a backend cannot serve is skipped with the dispatcher's reason. Under the interpreter the
triton cases use a reduced grid (small shapes; see SMALL_GRID and `reduced`): the interpreter runs every block
operation through numpy.

The main grids are pairwise over dtype x causal x head_dim x (Lq, Lk) x GQA x mask: every pair of values meets in
some case (55 cases) instead of the 5832 of the full product. Top-left causal goes through the raw op
(bottom_right=False); the other cases go through the public function, whose causal is bottom-right.
FLASH_GRID adds windows at the CUDA kernels' dtypes and head dims, with lengths that cross every tile edge of
their 64-row query blocks and 32/64-key tiles (Lq > Lk with bottom-right causal: rows that see no key).
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedattn
from conftest import (
    FUSED_BACKENDS,
    assert_close_2x,
    backend_cases,
    backend_params,
    device_for,
    grads,
    interpreted,
    max_abs_err,
    pairwise,
    randn,
    raw_op,
    skip_unsupported,
    to_device,
)
from fusedattn.reference import attention_ref


def fwd_op(backend):
    return raw_op("attention_fwd", backend)


def bwd_op(backend):
    return raw_op("attention_bwd", backend)


def reduced(backend, keep: bool) -> None:
    """Skip a case outside the interpreter's reduced grid (triton on CPU); no-op everywhere else."""
    if interpreted(backend) and not keep:
        pytest.skip("outside the reduced grid run under TRITON_INTERPRET=1")


def to_dev(backend, *tensors):
    return to_device(device_for(backend), *tensors)


B = 2
HEADS = {"mha": (2, 2), "gqa": (8, 2), "mqa": (4, 1), "gqa2": (4, 2)}  # name -> (Hq, Hkv)
LENGTHS = [(1, 1), (1, 97), (17, 17), (17, 257), (97, 17), (97, 97), (257, 1), (257, 97), (257, 257)]
GRID = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
        "causal": ["none", "top_left", "bottom_right"],
        "head_dim": [1, 8, 64, 80, 128, 256],
        "lens": LENGTHS,
        "heads": ["mha", "gqa", "mqa"],
        "mask": ["none", "bool", "additive", "fully_masked"],
    }
)
# The interpreter's grid: head dims from the task list (incl. non-powers of two), lengths <= 97.
SMALL_GRID = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
        "causal": ["none", "top_left", "bottom_right"],
        "head_dim": [16, 40, 64, 128],
        "lens": [(1, 17), (17, 17), (97, 33), (33, 97)],
        "heads": ["mha", "gqa2", "mqa"],
        "mask": ["none", "bool", "additive", "fully_masked"],
    }
)
# 1025-long sequences are slow in the float64 reference: a handful, with few heads.
LONG = [
    dict(dtype=torch.float32, causal="bottom_right", head_dim=64, lens=(1025, 1025), heads="mha", mask="none"),
    dict(dtype=torch.bfloat16, causal="none", head_dim=128, lens=(1, 1025), heads="gqa", mask="bool"),
    dict(dtype=torch.float16, causal="top_left", head_dim=64, lens=(1025, 257), heads="mqa", mask="additive"),
    dict(dtype=torch.bfloat16, causal="bottom_right", head_dim=80, lens=(257, 1025), heads="mqa", mask="fully_masked"),
]
# Windows at the CUDA kernels' dtypes and head dims (forward and backward; through lse for odd Lq). Lengths are
# odd and unequal so that every tile edge is crossed; not run under the interpreter.
FLASH_GRID = pairwise(
    {
        "dtype": [torch.bfloat16, torch.float16],
        "causal": ["none", "top_left", "bottom_right"],
        "head_dim": [64, 128, 256],
        "lens": LENGTHS + [(130, 511)],
        "heads": ["mha", "gqa", "mqa"],
        "window": [(-1, -1), (40, -1), (7, 21)],
    }
)


# ---------------------------------------------------------------------------------------------- helpers


def make_mask(kind, Hq, Lq, Lk, dtype, gen):
    """User mask in the shapes torch's SDPA accepts: bool (True = keep) or additive in the input dtype."""
    if kind == "none":
        return None
    if kind == "bool":  # (B, 1, Lq, Lk)
        return torch.rand(B, 1, Lq, Lk, generator=gen) > 0.25
    if kind == "additive":  # (1, Hq, Lq, Lk), with some -inf entries
        mask = torch.randn(1, Hq, Lq, Lk, generator=gen)
        mask[torch.rand(1, Hq, Lq, Lk, generator=gen) < 0.1] = -math.inf
        return mask.to(dtype)
    if kind == "fully_masked":  # (Lq, Lk) bool with some rows entirely False
        mask = torch.rand(Lq, Lk, generator=gen) > 0.2
        mask[::3] = False
        return mask
    raise AssertionError(kind)


def additive_full(mask, shape):
    """The raw op's mask: additive float32, expanded (stride 0 allowed) to (B, Hq, Lq, Lk)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)
    return mask.float().expand(shape)


def run_kernel(q, k, v, *, causal="none", attn_mask=None, window=(-1, -1), softcap=0.0, scale=None, backend="cpu"):
    """(out, lse) from `backend`'s kernel. top_left uses the raw op (the public function is bottom-right).
    Skips the test where `backend` cannot serve the case (the dispatcher's reason)."""
    skip_unsupported(
        "attention",
        backend,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        value_dim=v.shape[-1],
        has_mask=attn_mask is not None,
        softcap=softcap,
    )
    if causal == "top_left":
        Bq, Hq, Lq, D = q.shape
        mask = additive_full(attn_mask, (Bq, Hq, Lq, k.shape[2]))
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        return fwd_op(backend)(q, k, v, mask, scale, window[0], 0, False, softcap)
    return fusedattn.attention(
        q,
        k,
        v,
        causal=causal == "bottom_right",
        attn_mask=attn_mask,
        window=window,
        softcap=softcap,
        scale=scale,
        return_lse=True,
        backend=backend,
    )


def ref_kwargs(causal, attn_mask, **kw):
    return dict(
        causal=causal != "none",
        causal_align="top_left" if causal == "top_left" else "bottom_right",
        attn_mask=attn_mask,
        **kw,
    )


def reference_pair(q, k, v, **kwargs):
    """(ref, base): float64 ground truth from float64 inputs, and the same math in the input dtype."""
    mask = kwargs.pop("attn_mask", None)
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    ref = attention_ref(
        q.double(), k.double(), v.double(), attn_mask=mask64, return_lse=True, compute_dtype=torch.float64, **kwargs
    )
    base = attention_ref(q, k, v, attn_mask=mask, return_lse=True, compute_dtype=q.dtype, **kwargs)
    return ref, base


def check_forward(q, k, v, causal="none", attn_mask=None, backend="cpu", **kw):
    q, k, v, attn_mask = to_dev(backend, q, k, v, attn_mask)
    out, lse = run_kernel(q, k, v, causal=causal, attn_mask=attn_mask, backend=backend, **kw)
    (ref, ref_lse), (base, base_lse) = reference_pair(q, k, v, **ref_kwargs(causal, attn_mask, **kw))
    assert out.shape == ref.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()  # finite inputs: a row that sees no key gives 0, -inf
    assert_close_2x(out, ref, base)
    assert_close_2x(lse, ref_lse, base_lse, name="lse")
    return out, lse


def check_backward(
    q, k, v, gen, causal="none", attn_mask=None, use_lse=False, backend="cpu", per_grad_floor=False, **kw
):
    """per_grad_floor: the absolute floor relative to each gradient's own largest value (FLASH_GRID's rule)
    instead of the largest of the three."""
    Bq, Hq, Lq, _ = q.shape
    g_out = randn(Bq, Hq, Lq, v.shape[-1], dtype=q.dtype, gen=gen)
    g_lse = randn(Bq, Hq, Lq, gen=gen) if use_lse else None
    q, k, v, attn_mask, g_out, g_lse = to_dev(backend, q, k, v, attn_mask, g_out, g_lse)
    rkw = ref_kwargs(causal, attn_mask, **kw)
    mask64 = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    rkw64 = dict(rkw, attn_mask=mask64)

    def ref_fn(*x):
        return attention_ref(*x, return_lse=True, compute_dtype=torch.float64, **rkw64)

    def base_fn(*x):
        return attention_ref(*x, return_lse=True, compute_dtype=q.dtype, **rkw)

    def kernel_fn(*x):
        return run_kernel(*x, causal=causal, attn_mask=attn_mask, backend=backend, **kw)

    ref = grads(ref_fn, [q.double(), k.double(), v.double()], g_out.double(), None if g_lse is None else g_lse.double())
    base = grads(base_fn, [q, k, v], g_out, g_lse)
    got = grads(kernel_fn, [q, k, v], g_out, g_lse)
    # Absolute floor: 1e-5 relative to the largest gradient. The baseline can be exactly right where the kernel
    # cannot be (Lk = 1: autograd's softmax backward gives dS = 0 exactly, a flash backward's dP - rowsum(dO * O)
    # cancels to rounding noise of the size of |dO| |v|), so a fixed 1e-5 would fail correct fp32 kernels.
    atol = 1e-5 * max([1.0] + [r.abs().max().item() for r in ref if r.numel()])
    for name, g, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert g.shape == b.shape and g.shape == r.shape and g.dtype == q.dtype, name
        assert not g.isnan().any(), f"{name} has NaN"
        if per_grad_floor:
            atol = 1e-5 * max(r.abs().max().item() if r.numel() else 0.0, 1.0)
        assert_close_2x(g, r, b, factor=3, atol=atol, name=name)


def make_qkv(case, gen, B=B):
    D = case["head_dim"]
    Lq, Lk = case["lens"]
    Hq, Hkv = HEADS[case["heads"]]
    dt = case["dtype"]
    q = randn(B, Hq, Lq, D, dtype=dt, gen=gen)
    k = randn(B, Hkv, Lk, D, dtype=dt, gen=gen)
    v = randn(B, Hkv, Lk, D, dtype=dt, gen=gen)
    mask = make_mask(case.get("mask", "none"), Hq, Lq, Lk, dt, gen)
    return q, k, v, mask


# ---------------------------------------------------------------------------------------------- main grids


@pytest.mark.parametrize("backend,case", backend_cases(GRID + LONG, SMALL_GRID))
def test_forward(backend, case, gen):
    q, k, v, mask = make_qkv(case, gen)
    check_forward(q, k, v, causal=case["causal"], attn_mask=mask, backend=backend)


@pytest.mark.parametrize("backend,case", backend_cases(GRID + LONG[-1:], SMALL_GRID))
def test_backward(backend, case, gen):
    q, k, v, mask = make_qkv(case, gen)
    check_backward(q, k, v, gen, causal=case["causal"], attn_mask=mask, backend=backend)


@pytest.mark.parametrize("backend,case", backend_cases(FLASH_GRID, small_cases=[]))
def test_forward_flash_grid(backend, case, gen):
    q, k, v, _ = make_qkv(case, gen)
    check_forward(q, k, v, causal=case["causal"], window=case["window"], backend=backend)


@pytest.mark.parametrize("backend,case", backend_cases(FLASH_GRID, small_cases=[]))
def test_backward_flash_grid(backend, case, gen):
    q, k, v, _ = make_qkv(case, gen)
    check_backward(
        q,
        k,
        v,
        gen,
        causal=case["causal"],
        window=case["window"],
        use_lse=case["lens"][0] % 2 == 1,
        per_grad_floor=True,
        backend=backend,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_masked_rows_are_zero(gen, dtype, backend):
    """Bottom-right causal with Lq > Lk: the first Lq - Lk rows see no key -> out 0, lse -inf, zero gradients."""
    reduced(backend, dtype == torch.bfloat16)
    q = randn(1, 4, 150, 64, dtype=dtype, gen=gen)
    k, v = (randn(1, 2, 20, 64, dtype=dtype, gen=gen) for _ in range(2))
    out, lse = check_forward(q, k, v, causal="bottom_right", backend=backend)
    assert (out[:, :, :130] == 0).all() and (lse[:, :, :130] == -math.inf).all()
    assert (lse[:, :, 130:] > -math.inf).all()
    g = randn(1, 4, 150, 64, dtype=dtype, gen=gen)
    dq, dk, dv = grads(
        lambda *x: run_kernel(*x, causal="bottom_right", backend=backend), to_dev(backend, q, k, v), to_dev(backend, g)
    )
    assert (dq[:, :, :130] == 0).all() and not dq.isnan().any()
    check_backward(q, k, v, gen, causal="bottom_right", per_grad_floor=True, backend=backend)


def test_window_that_hides_some_rows(gen, backend):
    """Window (0, 0) around the bottom-right diagonal with Lq > Lk: query i sees only key i - 20, so the first 20
    rows see nothing; then a wider window, with a scale other than 1/sqrt(D)."""
    q = randn(2, 2, 90, 128, dtype=torch.bfloat16, gen=gen)
    k, v = (randn(2, 2, 70, 128, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    q, k, v = to_dev(backend, q, k, v)
    out, lse = run_kernel(q, k, v, causal="none", window=(0, 0), scale=0.3, backend=backend)
    ref, ref_lse = attention_ref(
        q.double(),
        k.double(),
        v.double(),
        return_lse=True,
        compute_dtype=torch.float64,
        **ref_kwargs("none", None, window=(0, 0), scale=0.3),
    )
    assert (lse == -math.inf).any() and not out.isnan().any()
    assert max_abs_err(lse, ref_lse) < 1e-2
    check_forward(q, k, v, causal="none", window=(3, 2), scale=0.3, backend=backend)
    check_backward(q, k, v, gen, causal="none", window=(3, 2), scale=0.3, per_grad_floor=True, backend=backend)


# ---------------------------------------------------------------------------------------------- window, softcap


WINDOWS = [(0, 0), (16, 0), (8, 8), (-1, 4), (4, -1), (0, -1), (-1, 0)]
WINDOW_GRID = pairwise(
    {
        "window": WINDOWS,
        "causal": ["none", "top_left", "bottom_right"],
        "lens": [(97, 97), (33, 129), (129, 33)],
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
    }
)
SMALL_WINDOW_GRID = pairwise(
    {
        "window": [(0, 0), (16, 0), (8, 8), (-1, 4), (4, -1)],
        "causal": ["none", "top_left", "bottom_right"],
        "lens": [(70, 70), (20, 70), (70, 20)],
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
    }
)


@pytest.mark.parametrize("backend,case", backend_cases(WINDOW_GRID, SMALL_WINDOW_GRID))
def test_window(backend, case, gen):
    Lq, Lk = case["lens"]
    q, k, v = (
        randn(B, 4, Lq, 32, dtype=case["dtype"], gen=gen),
        randn(B, 2, Lk, 32, dtype=case["dtype"], gen=gen),
        randn(B, 2, Lk, 32, dtype=case["dtype"], gen=gen),
    )
    check_forward(q, k, v, causal=case["causal"], window=case["window"], backend=backend)
    check_backward(q, k, v, gen, causal=case["causal"], window=case["window"], backend=backend)


SOFTCAP_GRID = pairwise(
    {
        "softcap": [1.0, 5.0, 30.0],
        "causal": ["none", "top_left", "bottom_right"],
        "mask": ["none", "additive", "fully_masked"],
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
    }
)


@pytest.mark.parametrize("backend,case", backend_cases(SOFTCAP_GRID))
def test_softcap(backend, case, gen):
    dt = case["dtype"]
    q = randn(B, 4, 37, 64, dtype=dt, gen=gen) * 3  # large scores so the cap bites
    k, v = randn(B, 4, 53, 64, dtype=dt, gen=gen), randn(B, 4, 53, 64, dtype=dt, gen=gen)
    mask = make_mask(case["mask"], 4, 37, 53, dt, gen)
    check_forward(q, k, v, causal=case["causal"], attn_mask=mask, softcap=case["softcap"], backend=backend)
    check_backward(q, k, v, gen, causal=case["causal"], attn_mask=mask, softcap=case["softcap"], backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_softcap_scale_combined(gen, dtype, backend):
    reduced(backend, dtype == torch.bfloat16)
    q, k, v = (
        randn(B, 6, 45, 48, dtype=dtype, gen=gen),
        randn(B, 2, 70, 48, dtype=dtype, gen=gen),
        randn(B, 2, 70, 48, dtype=dtype, gen=gen),
    )
    mask = make_mask("additive", 6, 45, 70, dtype, gen)
    kw = dict(window=(12, 3), softcap=8.0, scale=0.3, attn_mask=mask, backend=backend)
    check_forward(q, k, v, causal="bottom_right", **kw)
    check_backward(q, k, v, gen, causal="bottom_right", **kw)
    check_forward(q, k, v, causal="none", **kw)
    check_backward(q, k, v, gen, causal="none", **kw)


# ---------------------------------------------------------------------------------------------- shapes and layout


@pytest.mark.parametrize("D,Dv", [(64, 32), (32, 80), (8, 128), (128, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_head_dim_differs(gen, D, Dv, dtype, backend):
    reduced(backend, (D, Dv, dtype) in ((64, 32, torch.bfloat16), (32, 80, torch.float32)))
    q, k, v = (
        randn(B, 4, 29, D, dtype=dtype, gen=gen),
        randn(B, 2, 41, D, dtype=dtype, gen=gen),
        randn(B, 2, 41, Dv, dtype=dtype, gen=gen),
    )
    check_forward(q, k, v, causal="bottom_right", backend=backend)
    check_backward(q, k, v, gen, causal="bottom_right", backend=backend)
    check_forward(q, k, v, causal="top_left", backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", ["none", "bottom_right", "top_left"])
def test_non_contiguous_inputs(gen, dtype, causal, backend):
    reduced(backend, (dtype == torch.float16) == (causal != "top_left"))
    # (B, L, H, D) storage viewed as (B, H, L, D), the layout most models produce.
    Lq, Lk = 33, 47
    q = randn(B, Lq, 4, 64, dtype=dtype, gen=gen).transpose(1, 2)
    k = randn(B, Lk, 2, 64, dtype=dtype, gen=gen).transpose(1, 2)
    v = randn(B, Lk, 2, 96, dtype=dtype, gen=gen)[..., ::2].transpose(1, 2)  # also a strided head dim
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = make_mask("bool", 4, Lq, Lk, dtype, gen)
    check_forward(q, k, v, causal=causal, attn_mask=mask, backend=backend)
    check_backward(q, k, v, gen, causal=causal, attn_mask=mask, backend=backend)
    # same numbers as contiguous copies
    q, k, v, mask = to_dev(backend, q, k, v, mask)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = run_kernel(q, k, v, causal=causal, attn_mask=mask, backend=backend)[0]
    out_c = run_kernel(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, attn_mask=mask, backend=backend)[
        0
    ]
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)


def test_expanded_mask_strides(gen, backend):
    """Masks broadcast with stride 0 along batch, head and query rows."""
    q, k, v = randn(B, 4, 19, 32, gen=gen), randn(B, 4, 23, 32, gen=gen), randn(B, 4, 23, 32, gen=gen)
    for mask in (
        torch.randn(23, generator=gen),
        torch.randn(B, 1, 1, 23, generator=gen),
        torch.randn(1, 4, 19, 1, generator=gen),
        torch.randn(19, 23, generator=gen),
    ):
        check_forward(q, k, v, attn_mask=mask, backend=backend)
        check_forward(q, k, v, causal="top_left", attn_mask=mask, backend=backend)


# ---------------------------------------------------------------------------------------------- lse gradient, NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_backward_through_lse(gen, dtype, causal, backend):
    reduced(backend, dtype == torch.float32 or causal == "bottom_right")
    q, k, v = (
        randn(B, 4, 31, 64, dtype=dtype, gen=gen),
        randn(B, 2, 31, 64, dtype=dtype, gen=gen),
        randn(B, 2, 31, 64, dtype=dtype, gen=gen),
    )
    mask = make_mask("additive", 4, 31, 31, dtype, gen).clamp_min(-1e4)  # finite: every row keeps a key
    check_backward(q, k, v, gen, causal=causal, attn_mask=mask, use_lse=True, backend=backend)


def test_backward_through_lse_only_raw_op(gen, backend):
    skip_unsupported("attention", backend, dtype=torch.float32, head_dim=16)
    q, k, v = randn(1, 2, 9, 16, gen=gen), randn(1, 2, 12, 16, gen=gen), randn(1, 2, 12, 16, gen=gen)
    g_lse = randn(1, 2, 9, gen=gen)
    q, k, v, g_lse = to_dev(backend, q, k, v, g_lse)
    for t in (q, k, v):
        t.requires_grad_()
    _, lse = fwd_op(backend)(q, k, v, None, 0.25, -1, 0, True, 0.0)
    dq, dk, dv = torch.autograd.grad(lse, (q, k, v), g_lse, allow_unused=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, lse64 = attention_ref(q64, k64, v64, causal=True, scale=0.25, return_lse=True, compute_dtype=torch.float64)
    rq, rk, _ = torch.autograd.grad(lse64, (q64, k64, v64), g_lse.double(), allow_unused=True)
    torch.testing.assert_close(dq.double(), rq, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dk.double(), rk, atol=1e-5, rtol=1e-4)
    assert dv is None or (dv == 0).all()


def test_raw_bwd_any_strides(gen, backend):
    """The raw backward op takes out, lse, grad_out and grad_lse in any layout (the Triton launcher makes lse and
    grad_lse contiguous and gives out / grad_out a unit head-dim stride): the same numbers as contiguous ones (bit for
    bit on Triton)."""
    skip_unsupported("attention", backend, dtype=torch.float32, head_dim=16)
    q, k, v = to_dev(backend, *(randn(2, 2, 9, 16, gen=gen) for _ in range(3)))
    out, lse = fwd_op(backend)(q, k, v, None, 0.25, -1, 0, True, 0.0)
    g_out, g_lse = to_dev(backend, randn(2, 2, 9, 16, gen=gen), randn(2, 2, 9, gen=gen))

    def strided(t):  # same values, every stride different from the contiguous layout's
        return (
            torch.empty(tuple(reversed(t.shape)), dtype=t.dtype, device=t.device)
            .permute(*reversed(range(t.dim())))
            .copy_(t)
        )

    want = bwd_op(backend)(g_out, q, k, v, out, lse, None, 0.25, -1, 0, True, 0.0, g_lse)
    args = [strided(t) for t in (g_out, q, k, v, out, lse)]
    got = bwd_op(backend)(*args, None, 0.25, -1, 0, True, 0.0, strided(g_lse))
    assert not args[5].is_contiguous()
    tol = dict(atol=0, rtol=0) if backend == "triton" else {}  # the CPU kernel's blocking follows the strides
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_nan_in_query_row_stays_in_that_row(gen, dtype, causal, backend):
    reduced(
        backend,
        (dtype, causal) in ((torch.float32, "none"), (torch.bfloat16, "top_left"), (torch.float16, "bottom_right")),
    )
    q, k, v = (
        randn(B, 4, 21, 32, dtype=dtype, gen=gen),
        randn(B, 2, 21, 32, dtype=dtype, gen=gen),
        randn(B, 2, 21, 32, dtype=dtype, gen=gen),
    )
    q[1, 3, 7, 5] = math.nan
    q, k, v = to_dev(backend, q, k, v)
    out, lse = run_kernel(q, k, v, causal=causal, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    assert out[1, 3, 7].isnan().all(), "NaN in q[1, 3, 7] must reach out[1, 3, 7]"
    assert lse[1, 3, 7].isnan(), "NaN in q[1, 3, 7] must reach lse[1, 3, 7]"
    bad = torch.zeros(out.shape[:-1], dtype=torch.bool)
    bad[1, 3, 7] = True
    assert not out[~bad].isnan().any() and not lse[~bad].isnan().any()


# ---------------------------------------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("Bz,Lq,Lk", [(0, 5, 7), (2, 0, 7), (2, 5, 0), (2, 0, 0)])
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_empty_inputs(gen, Bz, Lq, Lk, causal, backend):
    q = to_dev(backend, randn(Bz, 4, Lq, 16, gen=gen)).requires_grad_()
    k = to_dev(backend, randn(Bz, 2, Lk, 16, gen=gen)).requires_grad_()
    v = to_dev(backend, randn(Bz, 2, Lk, 24, gen=gen)).requires_grad_()
    out, lse = run_kernel(q, k, v, causal=causal, backend=backend)
    assert out.shape == (Bz, 4, Lq, 24) and lse.shape == (Bz, 4, Lq)
    assert (out == 0).all(), "a query that sees no key must output 0"
    ref_lse = attention_ref(q, k, v, return_lse=True)[1]
    assert max_abs_err(lse, ref_lse) == 0, "lse of a row with no key is -inf"
    out.sum().backward()
    assert q.grad.shape == q.shape and (q.grad == 0).all()
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


# ---------------------------------------------------------------------------------------------- opcheck


def _fwd_args(gen, dtype, with_mask, requires_grad, bottom_right=True, window=(-1, 0), softcap=0.0, backend="cpu"):
    skip_unsupported("attention", backend, dtype=dtype, head_dim=8, value_dim=12, has_mask=with_mask, softcap=softcap)
    q = to_dev(backend, randn(2, 4, 5, 8, dtype=dtype, gen=gen)).requires_grad_(requires_grad)
    k = to_dev(backend, randn(2, 2, 7, 8, dtype=dtype, gen=gen)).requires_grad_(requires_grad)
    v = to_dev(backend, randn(2, 2, 7, 12, dtype=dtype, gen=gen)).requires_grad_(requires_grad)
    mask = to_dev(backend, torch.randn(1, 1, 5, 7, generator=gen)).expand(2, 4, 5, 7) if with_mask else None
    return (q, k, v, mask, 0.35, window[0], window[1], bottom_right, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_fwd(gen, dtype, with_mask, requires_grad, backend):
    args = _fwd_args(gen, dtype, with_mask, requires_grad, backend=backend)
    torch.library.opcheck(fwd_op(backend).default, args)


def test_opcheck_fwd_window_softcap_top_left(gen, backend):
    args = _fwd_args(gen, torch.float32, True, True, bottom_right=False, window=(2, 1), softcap=3.0, backend=backend)
    torch.library.opcheck(fwd_op(backend).default, args)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_grad_lse", [False, True])
def test_opcheck_bwd(gen, with_mask, with_grad_lse, backend):
    q, k, v, mask, scale, wl, wr, br, cap = _fwd_args(gen, torch.float32, with_mask, False, backend=backend)
    out, lse = fwd_op(backend)(q, k, v, mask, scale, wl, wr, br, cap)
    grad_out = to_dev(backend, randn(*out.shape, gen=gen))
    grad_lse = to_dev(backend, randn(*lse.shape, gen=gen)) if with_grad_lse else None
    args = (grad_out, q, k, v, out, lse, mask, scale, wl, wr, br, cap, grad_lse)
    torch.library.opcheck(bwd_op(backend).default, args)
    # and the op's numbers: the reference's autograd
    dq, dk, dv = bwd_op(backend)(*args)
    ref_dq, ref_dk, ref_dv = grads(
        lambda *x: attention_ref(
            *x,
            attn_mask=None if mask is None else mask.double(),
            causal=True,
            scale=scale,
            return_lse=True,
            compute_dtype=torch.float64,
        ),
        [q.double(), k.double(), v.double()],
        grad_out.double(),
        None if grad_lse is None else grad_lse.double(),
    )
    for got, ref in ((dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)


def test_opcheck_head_dim_64(gen, backend):
    """The ops at a head dim and dtype every fused backend covers (the CUDA kernels take bf16/fp16, D 64/128/256)."""
    skip_unsupported("attention", backend, dtype=torch.bfloat16, head_dim=64)
    q, k, v = (randn(1, 2, 37, 64, dtype=torch.bfloat16, gen=gen, device=device_for(backend)) for _ in range(3))
    torch.library.opcheck(fwd_op(backend), (q, k, v, None, 0.125, -1, 0, True, 0.0))
    out, lse = fwd_op(backend)(q, k, v, None, 0.125, -1, 0, True, 0.0)
    torch.library.opcheck(
        bwd_op(backend), (torch.randn_like(out), q, k, v, out, lse, None, 0.125, -1, 0, True, 0.0, None)
    )


# ---------------------------------------------------------------------------------------------- torch.compile


class _FlashStyle(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v, mask):
        out, lse = fusedattn.attention(q, k, v, causal=True, attn_mask=mask, return_lse=True, backend=self.backend)
        return out, lse


class _DropIn(torch.nn.Module):
    """The drop-in picks its kernel from the device: cpu for CPU tensors, triton for CUDA ones."""

    def __init__(self, backend):
        super().__init__()

    def forward(self, q, k, v, mask):
        out = fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out, out.sum(-1)


@pytest.mark.parametrize("kernel", backend_params(FUSED_BACKENDS))
@pytest.mark.parametrize("module", [_FlashStyle, _DropIn])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(gen, module, backend, kernel):
    skip_unsupported("attention", kernel, dtype=torch.float32, head_dim=16, has_mask=True)
    if module is _DropIn and interpreted(kernel):
        pytest.skip("the drop-in runs the triton kernels on CUDA tensors only")
    torch._dynamo.reset()
    q = to_dev(kernel, randn(2, 4, 11, 16, gen=gen)).requires_grad_()
    k = to_dev(kernel, randn(2, 2, 13, 16, gen=gen)).requires_grad_()
    v = to_dev(kernel, randn(2, 2, 13, 16, gen=gen)).requires_grad_()
    mask = torch.rand(2, 1, 11, 13, generator=gen) > 0.3
    mask[..., -1] = True
    mask = to_dev(kernel, mask)
    model = module(kernel)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out_c, lse_c = compiled(q, k, v, mask)
    out_e, lse_e = model(q, k, v, mask)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_c, lse_e, atol=1e-5, rtol=1e-5)
    g = to_dev(kernel, randn(*out_e.shape, gen=gen))
    grads_c = torch.autograd.grad((out_c * g).sum() + lse_c.sum(), (q, k, v))
    grads_e = torch.autograd.grad((out_e * g).sum() + lse_e.sum(), (q, k, v))
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-5)


def test_raw_op_torch_compile_fullgraph(gen, backend):
    """The raw forward op compiled (default backend, fullgraph) gives the eager op's numbers exactly."""
    skip_unsupported("attention", backend, dtype=torch.float16, head_dim=64)
    q, k, v = (randn(1, 2, 50, 64, dtype=torch.float16, gen=gen, device=device_for(backend)) for _ in range(3))
    op = fwd_op(backend)

    def f(q, k, v):
        return op(q, k, v, None, 0.125, -1, 0, True, 0.0)[0]

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- torch.func


def _func_transform(transform: str, fn, weight):
    """torch.func.grad of <fn(q, k, v), weight> or torch.func.jacrev of fn, in q, k and v."""
    if transform == "grad":
        return torch.func.grad(lambda q, k, v: (fn(q, k, v) * weight).sum(), argnums=(0, 1, 2))
    return torch.func.jacrev(fn, argnums=(0, 1, 2))


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
@pytest.mark.parametrize("entry", ["attention", "sdpa"])
def test_torch_func_grad_and_jacrev(gen, transform, entry, backend):
    """torch.func.grad / jacrev run through attention() and the drop-in as through torch's SDPA (they raised
    "must override setup_context": the op's autograd was an autograd.Function in the old ctx form) and agree with
    the reference's under the 3x rule; differentiating a fused backward once more still raises."""
    if entry == "sdpa" and backend != "cpu":
        pytest.skip("the drop-in picks its kernel itself (cpu tensors: the cpu kernel)")
    skip_unsupported("attention", backend, dtype=torch.float32, head_dim=8)
    q, k, v = randn(1, 4, 7, 8, gen=gen), randn(1, 2, 9, 8, gen=gen), randn(1, 2, 9, 8, gen=gen)
    weight = randn(1, 4, 7, 8, gen=gen)
    mask = torch.rand(1, 1, 7, 9, generator=gen) > 0.3
    mask[..., -1] = True
    if entry == "attention":

        def fn(q, k, v):
            return fusedattn.attention(q, k, v, attn_mask=mask_d, causal=True, backend=backend)
    else:

        def fn(q, k, v):
            return fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask_d, enable_gqa=True)

    def ref(dtype):
        def f(q, k, v):
            return attention_ref(q, k, v, attn_mask=mask, causal=entry == "attention", compute_dtype=dtype)

        return f

    q_d, k_d, v_d, w_d, mask_d = to_dev(backend, q, k, v, weight, mask)
    got = _func_transform(transform, fn, w_d)(q_d, k_d, v_d)
    want = _func_transform(transform, ref(torch.float64), weight.double())(q.double(), k.double(), v.double())
    base = _func_transform(transform, ref(torch.float32), weight)(q, k, v)
    for name, g, r, b in zip("qkv", got, want, base):
        assert_close_2x(g.cpu(), r, b, factor=3, name=f"{transform} d{name}")
    if backend in FUSED_BACKENDS:  # the reference differentiates twice
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.func.grad(lambda q: _func_transform("grad", fn, w_d)(q, k_d, v_d)[1].sum())(q_d)


# --------------------------------------------------------------------------------------------------------------
# CPU bf16 forward paths (csrc/cpu/dispatch.cpp): AMX tiles, vdpbf16ps dot products, or bf16 widened to fp32,
# chosen from cpuid and FUSEDATTN_CPU_BF16 (read at every call). Every path available here must meet the 2x rule;
# on a CPU without the instructions a forced path falls back to widening, which must meet it too.
# --------------------------------------------------------------------------------------------------------------
def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _bf16_info() -> str:
    return fusedattn._C.build_info()["cpu_bf16_forward"]


@pytest.mark.parametrize("path", ["auto", "amx", "avx512_bf16", "off"])
@pytest.mark.parametrize(
    "case",
    [
        dict(B=1, H=2, Hkv=2, Lq=64, Lk=64, D=64, Dv=64, causal="none"),
        dict(B=2, H=4, Hkv=2, Lq=77, Lk=301, D=64, Dv=64, causal="bottom_right"),
        dict(B=1, H=2, Hkv=1, Lq=130, Lk=97, D=128, Dv=128, causal="top_left"),
        dict(B=1, H=2, Hkv=2, Lq=70, Lk=259, D=96, Dv=32, causal="none", window=(17, 3)),
        dict(B=1, H=2, Hkv=2, Lq=33, Lk=47, D=40, Dv=24, causal="none"),  # not an AMX shape: widened
        dict(B=1, H=1, Hkv=1, Lq=65, Lk=129, D=64, Dv=64, causal="none", softcap=20.0),
        dict(B=1, H=2, Hkv=2, Lq=40, Lk=90, D=64, Dv=64, causal="none", mask=True),
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()),
)
def test_cpu_bf16_forward_paths(path, case, gen, monkeypatch):
    if "cpu_bf16_forward" not in fusedattn._C.build_info():
        pytest.skip("fusedattn._C reports no bf16 forward path")
    monkeypatch.setenv("FUSEDATTN_CPU_BF16", path)
    c = dict(case)
    B, H, Hkv, Lq, Lk, D, Dv = (c.pop(n) for n in ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv"))
    mask = randn(B, 1, Lq, Lk, gen=gen) if c.pop("mask", False) else None
    q = randn(B, H, Lq, D, dtype=torch.bfloat16, gen=gen)
    # K and V with non-contiguous strides (the AMX and dot-product paths copy or read them in place)
    k = randn(B, Lk, Hkv, D, dtype=torch.bfloat16, gen=gen).transpose(1, 2)
    v = randn(B, Hkv, Lk, Dv, dtype=torch.bfloat16, gen=gen)
    check_forward(q, k, v, attn_mask=mask, **c)


def test_cpu_bf16_path_reported():
    """`info` names the path: AMX where the CPU has it (and the build), and the reason otherwise."""
    bi = fusedattn._C.build_info()
    if "cpu_bf16_forward" not in bi:
        pytest.skip("fusedattn._C reports no bf16 forward path")
    line = _bf16_info()
    flags = _cpu_flags()
    built = "AVX512_BF16" in bi["cpu_isas"].split(",")
    if built and bi["cpu_isa_selected"] == "AVX512" and {"amx_bf16", "amx_tile"} <= flags:
        assert line.startswith("AMX tiles"), line
    else:
        assert "widened to fp32" in line and "AMX" in line, line


def test_cpu_bf16_env_off_and_bad_value(monkeypatch):
    monkeypatch.setenv("FUSEDATTN_CPU_BF16", "off")
    assert "turned off by FUSEDATTN_CPU_BF16=off" in _bf16_info()
    monkeypatch.setenv("FUSEDATTN_CPU_BF16", "fast")
    q = torch.randn(1, 1, 8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="FUSEDATTN_CPU_BF16"):
        fusedattn.attention(q, q, q)
