"""The reference is the oracle for every other test, so it is checked against torch's SDPA (math backend) and
against explicit, brute-force constructions of each mask. Needs only PyTorch, not the compiled extension."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import max_abs_err, randn
from fusedattn.reference import attention_ref, make_window_mask

LENGTHS = [(1, 1), (1, 13), (13, 1), (17, 17), (9, 31), (31, 9)]


def sdpa_math(q, k, v, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def brute_window_mask(Lq, Lk, causal, align, window):
    """The definition, one (i, j) at a time."""
    off = Lk - Lq if align == "bottom_right" else 0
    left, right = window
    if causal:
        right = 0
    mask = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        for j in range(Lk):
            mask[i, j] = (left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)
    return mask


def qkv(gen, B=2, Hq=4, Hkv=4, Lq=17, Lk=17, D=16, Dv=None, dtype=torch.float32):
    return (
        randn(B, Hq, Lq, D, dtype=dtype, gen=gen),
        randn(B, Hkv, Lk, D, dtype=dtype, gen=gen),
        randn(B, Hkv, Lk, Dv or D, dtype=dtype, gen=gen),
    )


# ---------------------------------------------------------------------------------------------- vs torch SDPA


@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("mode", ["none", "causal_top_left", "bool_mask", "float_mask", "scale"])
def test_matches_torch_sdpa(gen, mode, Lq, Lk):
    q, k, v = qkv(gen, Lq=Lq, Lk=Lk)
    ref_kwargs, sdpa_kwargs = {}, {}
    if mode == "causal_top_left":
        ref_kwargs = dict(causal=True, causal_align="top_left")
        sdpa_kwargs = dict(is_causal=True)
        if Lq > Lk:  # torch's top-left causal leaves no row empty, since query 0 sees key 0.
            assert make_window_mask(Lq, Lk, True, "top_left").any(-1).all()
    elif mode == "bool_mask":
        mask = torch.rand(2, 1, Lq, Lk, generator=gen) > 0.3
        mask[..., 0] = True  # keep every row non-empty (torch's rows of all False are covered elsewhere)
        ref_kwargs = sdpa_kwargs = dict(attn_mask=mask)
    elif mode == "float_mask":
        mask = randn(Lq, Lk, gen=gen)
        ref_kwargs = sdpa_kwargs = dict(attn_mask=mask)
    elif mode == "scale":
        ref_kwargs = sdpa_kwargs = dict(scale=0.37)
    out = attention_ref(q, k, v, **ref_kwargs)
    expected = sdpa_math(q, k, v, **sdpa_kwargs)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)
    # float64 reference agrees with torch in float64 to rounding.
    out64 = attention_ref(
        q.double(),
        k.double(),
        v.double(),
        compute_dtype=torch.float64,
        **{
            key: (val.double() if key == "attn_mask" and val.is_floating_point() else val)
            for key, val in ref_kwargs.items()
        },
    )
    exp64 = sdpa_math(
        q.double(),
        k.double(),
        v.double(),
        **{
            key: (val.double() if key == "attn_mask" and val.is_floating_point() else val)
            for key, val in sdpa_kwargs.items()
        },
    )
    torch.testing.assert_close(out64, exp64, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (4, 2), (6, 3), (8, 2)])
def test_gqa_matches_torch_enable_gqa(gen, Hq, Hkv):
    q, k, v = qkv(gen, Hq=Hq, Hkv=Hkv, Lq=9, Lk=13)
    out = attention_ref(q, k, v, causal=True, causal_align="top_left")
    expected = sdpa_math(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)
    # and the repeat_interleave reading of it: query head h uses kv head h // (Hq // Hkv)
    g = Hq // Hkv
    for h in range(Hq):
        one = attention_ref(
            q[:, h : h + 1], k[:, h // g : h // g + 1], v[:, h // g : h // g + 1], causal=True, causal_align="top_left"
        )
        torch.testing.assert_close(out[:, h : h + 1], one, atol=0, rtol=0)


def test_value_head_dim_differs(gen):
    q, k, v = qkv(gen, Lq=7, Lk=11, D=16, Dv=24)
    out = attention_ref(q, k, v)
    assert out.shape == (2, 4, 7, 24)
    torch.testing.assert_close(out, sdpa_math(q, k, v), atol=2e-6, rtol=2e-5)


# ---------------------------------------------------------------------------------------------- causal / window


@pytest.mark.parametrize("Lq,Lk", LENGTHS + [(5, 12), (12, 5)])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize(
    "causal,window",
    [
        (True, (-1, -1)),
        (False, (-1, -1)),
        (False, (3, 0)),
        (False, (0, 0)),
        (False, (2, 4)),
        (False, (-1, 2)),
        (False, (4, -1)),
        (True, (3, -1)),
        (True, (2, 5)),
        (False, (0, -1)),
        (False, (-1, 0)),
    ],
)
def test_window_mask_matches_definition(Lq, Lk, align, causal, window):
    got = make_window_mask(Lq, Lk, causal, align, window)
    assert got.dtype == torch.bool and got.shape == (Lq, Lk)
    assert torch.equal(got, brute_window_mask(Lq, Lk, causal, align, window))


def test_window_mask_known_values():
    # bottom-right causal, Lq=2, Lk=4: the last query sees every key.
    assert make_window_mask(2, 4, causal=True).tolist() == [[True, True, True, False], [True, True, True, True]]
    # top-left causal (torch's is_causal)
    assert make_window_mask(2, 4, causal=True, causal_align="top_left").tolist() == [
        [True, False, False, False],
        [True, True, False, False],
    ]
    # bottom-right causal with Lq > Lk: the first Lq - Lk rows see nothing.
    assert make_window_mask(4, 2, causal=True).tolist() == [[False, False], [False, False], [True, False], [True, True]]
    # causal (-1, -1) is window (-1, 0)
    assert torch.equal(make_window_mask(5, 9, causal=True), make_window_mask(5, 9, window=(-1, 0)))


def test_bottom_right_causal_matches_torch_causal_lower_right(gen):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = qkv(gen, Lq=9, Lk=23)
    out = attention_ref(q, k, v, causal=True)  # bottom_right is the default
    expected = sdpa_math(q, k, v, attn_mask=causal_lower_right(9, 23))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("Lq,Lk", [(9, 23), (23, 9), (17, 17), (1, 7)])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (3, 2)), (True, (4, -1)), (False, (-1, 1))])
def test_causal_and_window_equal_explicit_mask(gen, Lq, Lk, align, causal, window):
    q, k, v = qkv(gen, Lq=Lq, Lk=Lk)
    mask = brute_window_mask(Lq, Lk, causal, align, window)
    out, lse = attention_ref(q, k, v, causal=causal, causal_align=align, window=window, return_lse=True)
    out_m, lse_m = attention_ref(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(out, out_m) and torch.equal(lse, lse_m)
    # rows with at least one visible key agree with torch's SDPA given the same explicit mask
    rows = mask.any(-1)
    expected = sdpa_math(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[..., rows, :], expected[..., rows, :], atol=2e-6, rtol=2e-5)


def test_window_combines_with_user_mask(gen):
    q, k, v = qkv(gen, Lq=13, Lk=13)
    user = torch.rand(2, 4, 13, 13, generator=gen) > 0.2
    win = make_window_mask(13, 13, True, "bottom_right", (4, -1))
    out = attention_ref(q, k, v, attn_mask=user, causal=True, window=(4, -1))
    torch.testing.assert_close(out, attention_ref(q, k, v, attn_mask=user & win), atol=0, rtol=0)
    addm = randn(13, 13, gen=gen)
    out = attention_ref(q, k, v, attn_mask=addm, causal=True)
    torch.testing.assert_close(
        out,
        attention_ref(q, k, v, attn_mask=addm.masked_fill(~make_window_mask(13, 13, True), -math.inf)),
        atol=1e-6,
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------------------------- masked rows, lse


@pytest.mark.parametrize("how", ["bool", "float_inf", "causal_bottom_right", "window"])
def test_fully_masked_rows_are_zero_with_lse_minus_inf(gen, how):
    B, H, Lq, Lk = 2, 3, 6, 4
    q, k, v = qkv(gen, B=B, Hq=H, Hkv=H, Lq=Lq, Lk=Lk)
    kwargs = {}
    empty = torch.zeros(Lq, dtype=torch.bool)
    if how == "bool":
        mask = torch.rand(Lq, Lk, generator=gen) > 0.5
        mask[:, 0] = True
        mask[[1, 4]] = False
        empty[[1, 4]] = True
        kwargs = dict(attn_mask=mask)
    elif how == "float_inf":
        mask = randn(Lq, Lk, gen=gen)
        mask[[0, 5]] = -math.inf
        empty[[0, 5]] = True
        kwargs = dict(attn_mask=mask)
    elif how == "causal_bottom_right":  # Lq > Lk: the first Lq - Lk rows see nothing
        kwargs = dict(causal=True)
        empty[: Lq - Lk] = True
    elif how == "window":  # window (0, 0) bottom-right: rows i with i + Lk - Lq < 0 see nothing
        kwargs = dict(window=(0, 0))
        empty[: Lq - Lk] = True
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = attention_ref(q, k, v, return_lse=True, **kwargs)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :, empty] == 0).all()
    assert (lse[:, :, empty] == -math.inf).all()
    assert lse[:, :, ~empty].isfinite().all()
    # the gradient of the output through fully masked rows is finite and zero for those rows' queries
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.isfinite().all()
    assert (q.grad[:, :, empty] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_lse_is_logsumexp_of_scores(gen, causal, softcap):
    q, k, v = qkv(gen, Lq=11, Lk=19, D=8)
    scale = 0.5
    _, lse = attention_ref(q, k, v, causal=causal, scale=scale, softcap=softcap, return_lse=True)
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        s = s.masked_fill(~brute_window_mask(11, 19, True, "bottom_right", (-1, -1)), -math.inf)
    assert lse.shape == (2, 4, 11) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, dim=-1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("softcap", [1.0, 5.0, 30.0])
def test_softcap_formula(gen, softcap):
    q, k, v = qkv(gen, Lq=7, Lk=10, D=8)
    q = q * 4  # large scores so the cap matters
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(8)
    capped = softcap * torch.tanh(s / softcap)
    assert capped.abs().max() <= softcap
    expected = torch.softmax(capped, dim=-1) @ v.double()
    out = attention_ref(q, k, v, softcap=softcap, compute_dtype=torch.float64)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=1e-6)
    # softcap is applied before an additive mask
    mask = randn(7, 10, gen=gen)
    expected = torch.softmax(capped + mask.double(), dim=-1) @ v.double()
    out = attention_ref(q, k, v, softcap=softcap, attn_mask=mask, compute_dtype=torch.float64)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- dtypes, NaN, edges


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.float64])
def test_dtypes(gen, dtype, compute_dtype):
    compute_dtype = compute_dtype or dtype
    q, k, v = qkv(gen, Lq=5, Lk=8, dtype=dtype)
    out, lse = attention_ref(q, k, v, causal=True, return_lse=True, compute_dtype=compute_dtype)
    assert out.dtype == dtype and out.shape == (2, 4, 5, 16)
    assert lse.dtype == (torch.float64 if compute_dtype == torch.float64 else torch.float32)
    exact = attention_ref(q.double(), k.double(), v.double(), causal=True, compute_dtype=torch.float64)
    tol = {torch.float16: 5e-3, torch.bfloat16: 4e-2}.get(dtype, 1e-5)
    assert max_abs_err(out.double(), exact) < tol


def test_nan_propagates_only_to_its_row(gen):
    q, k, v = qkv(gen, Hq=4, Hkv=2, Lq=6, Lk=9)
    q[1, 2, 3, 5] = math.nan
    out, lse = attention_ref(q, k, v, return_lse=True)
    assert out[1, 2, 3].isnan().all() and lse[1, 2, 3].isnan()
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[1, 2, 3] = True
    assert not out[~bad].isnan().any()
    # NaN in a key reaches the rows that see it, not the rows that mask it out.
    q, k, v = qkv(gen, Lq=4, Lk=4)
    k[0, 0, 2, 0] = math.nan
    out = attention_ref(q, k, v, causal=True)
    assert not out[0, 0, :2].isnan().any() and out[0, 0, 2:].isnan().all()


def test_empty_inputs(gen):
    for B, Lq, Lk in [(0, 5, 7), (2, 0, 7), (2, 5, 0), (2, 0, 0)]:
        q, k, v = qkv(gen, B=B, Lq=Lq, Lk=Lk, Dv=12)
        out, lse = attention_ref(q, k, v, causal=True, return_lse=True)
        assert out.shape == (B, 4, Lq, 12) and lse.shape == (B, 4, Lq)
        assert (out == 0).all() and (lse == -math.inf).all()


def test_bad_inputs(gen):
    q, k, v = qkv(gen, Hq=6, Hkv=4)
    with pytest.raises(ValueError, match="multiple"):
        attention_ref(q, k, v)
    q, k, v = qkv(gen)
    with pytest.raises(ValueError, match="window"):
        attention_ref(q, k, v, window=(-2, 0))
    with pytest.raises(ValueError, match="causal_align"):
        attention_ref(q, k, v, causal=True, causal_align="middle")
    with pytest.raises(ValueError, match="attn_mask"):
        attention_ref(q, k, v, attn_mask=torch.ones(3, 17, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D"):
        attention_ref(q[0], k[0], v[0])


# ---------------------------------------------------------------------------------------------- dropout


def test_dropout_reproducible_with_generator(gen):
    q, k, v = qkv(gen, Lq=8, Lk=12)
    p = 0.3
    o1, lse1 = attention_ref(q, k, v, dropout_p=p, return_lse=True, generator=torch.Generator().manual_seed(7))
    o2, lse2 = attention_ref(q, k, v, dropout_p=p, return_lse=True, generator=torch.Generator().manual_seed(7))
    o3 = attention_ref(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(8))
    o0, lse0 = attention_ref(q, k, v, return_lse=True)
    assert torch.equal(o1, o2) and torch.equal(lse1, lse2)
    assert not torch.equal(o1, o3) and not torch.equal(o1, o0)
    torch.testing.assert_close(lse1, lse0, atol=0, rtol=0)  # the lse ignores dropout
    assert torch.equal(attention_ref(q, k, v, dropout_p=0.0), o0)
    assert (attention_ref(q, k, v, dropout_p=1.0) == 0).all()


def test_dropout_scales_kept_probabilities(gen):
    # With v = identity the output rows are the (dropped) probability rows themselves.
    Lq, Lk, p = 16, 32, 0.25
    q = randn(1, 1, Lq, 8, gen=gen)
    k = randn(1, 1, Lk, 8, gen=gen)
    v = torch.eye(Lk).view(1, 1, Lk, Lk)
    probs = attention_ref(q, k, v, compute_dtype=torch.float64)
    dropped = attention_ref(
        q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(0), compute_dtype=torch.float64
    )
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p))
    frac_dropped = 1 - kept.double().mean().item()
    assert abs(frac_dropped - p) < 0.08  # 512 Bernoulli draws: ~4 standard deviations
