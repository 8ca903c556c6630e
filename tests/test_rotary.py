"""Rotary embedding in the KV-cache append: ``decode_attention(rotary_cos=, rotary_sin=, rotary_interleaved=)``
on every backend against the reference (which rotates by complex multiplication), output, lse and the rotated
keys written into the cache, under the 2x rule; flash-attn's position rules; bad tables; compile."""

from __future__ import annotations

import math

import pytest
import torch

import fusedattn
from conftest import assert_close_2x, backend_cases, device_for, randn, skip_unsupported
from fusedattn.reference import decode_attention_ref, rotary_ref
from fusedattn.rotary import apply_rotary

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tables(n, rd, dtype=torch.float32, gen=None):
    angle = torch.rand(n, rd // 2, generator=gen) * 2 * math.pi
    return angle.cos().to(dtype), angle.sin().to(dtype)


CASES = [
    dict(B=3, Lq=1, Hq=8, Hkv=2, D=64, rd=64, lengths=[0, 17, 97], page=None, causal=True, window=(-1, -1)),
    dict(B=2, Lq=3, Hq=4, Hkv=4, D=128, rd=64, lengths=[33, 200], page=16, causal=True, window=(-1, -1)),
    dict(B=2, Lq=3, Hq=2, Hkv=1, D=80, rd=32, lengths=[5, 40], page=None, causal=False, window=(-1, -1)),
    dict(B=1, Lq=2, Hq=2, Hkv=1, D=32, rd=32, lengths=[50], page=7, causal=False, window=(8, 0)),
]
SMALL = [
    dict(B=2, Lq=2, Hq=2, Hkv=1, D=16, rd=16, lengths=[0, 9], page=4, causal=True, window=(-1, -1)),
    dict(B=1, Lq=2, Hq=2, Hkv=2, D=16, rd=8, lengths=[6], page=None, causal=False, window=(-1, -1)),
]


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend,case", backend_cases(CASES, SMALL))
def test_decode_rotary(backend, case, dtype, interleaved, gen):
    skip_unsupported("decode", backend, dtype=dtype, head_dim=case["D"])
    B, Lq, Hq, Hkv, D, page = (case[n] for n in ("B", "Lq", "Hq", "Hkv", "D", "page"))
    lengths, Lnew = case["lengths"], case["Lq"]
    dev = device_for(backend)
    L_max = max(lengths) + Lnew
    if page is None:
        shape, table = (B, L_max, Hkv, D), None
    else:
        per = -(-L_max // page)
        shape, table = (B * per, page, Hkv, D), torch.randperm(B * per, generator=gen).to(torch.int32).view(B, per)
    kc, vc = randn(*shape, gen=gen), randn(*shape, gen=gen)
    q, kn, vn = randn(B, Lq, Hq, D, gen=gen), randn(B, Lnew, Hkv, D, gen=gen), randn(B, Lnew, Hkv, D, gen=gen)
    cos, sin = _tables(L_max + 3, case["rd"], gen=gen)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    kw = dict(causal=case["causal"], window=case["window"], rotary_interleaved=interleaved)

    def run(fn, cdt, dev="cpu", **extra):
        kcc, vcc = kc.to(dev, cdt), vc.to(dev, cdt)
        kn_in = kn.to(dev, cdt)
        out, lse = fn(
            q.to(dev, cdt),
            kcc,
            vcc,
            k_new=kn_in,
            v_new=vn.to(dev, cdt),
            cache_seqlens=seqlens.to(dev),
            block_table=None if table is None else table.to(dev),
            rotary_cos=cos.to(dev, cdt),
            rotary_sin=sin.to(dev, cdt),
            return_lse=True,
            **kw,
            **extra,
        )
        assert torch.equal(kn_in.cpu(), kn.to(cdt))  # k_new itself is not rotated in place
        return out.cpu(), lse.cpu(), kcc.cpu()

    with torch.no_grad():
        out, lse, k_after = run(fusedattn.decode_attention, dtype, dev, backend=backend)
        r_out, r_lse, r_k = run(decode_attention_ref, torch.float64, compute_dtype=torch.float64)
        b_out, b_lse, b_k = run(decode_attention_ref, dtype, compute_dtype=dtype)
    assert_close_2x(out, r_out, b_out)
    assert_close_2x(lse, r_lse, b_lse.float(), name="lse")
    assert_close_2x(k_after, r_k, b_k, name="k_cache")  # the rotated keys were appended


def test_positions_follow_flash_attn():
    """k_new row i (and q row i, when causal) at cache_seqlens + i; non-causal q rows all at cache_seqlens."""
    g = torch.Generator().manual_seed(0)
    B, L, H, D = 2, 3, 2, 8
    x = torch.randn(B, L, H, D, generator=g)
    cos, sin = _tables(16, D, gen=g)
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]])
    got = apply_rotary(x, cos, sin, pos)
    for b, start in enumerate((4, 0)):
        torch.testing.assert_close(got[b], rotary_ref(x[b], cos, sin, start))
    same = apply_rotary(x, cos, sin, torch.tensor([[4] * 3, [0] * 3]), interleaved=True)
    torch.testing.assert_close(same[0], rotary_ref(x[0], cos, sin, 4, interleaved=True, same_position=True))


def test_matches_the_model_rotary():
    """Our GPT's RotaryEmbedding (half-split) is apply_rotary with interleaved=False."""
    from fusedattn.transformer import RotaryEmbedding

    rope = RotaryEmbedding(16, 32)
    x = torch.randn(2, 5, 3, 16)
    pos = torch.arange(5).expand(2, 5) + torch.tensor([[0], [7]])
    torch.testing.assert_close(rope(x, pos), apply_rotary(x, rope.cos, rope.sin, pos), atol=0, rtol=0)


def _call(**over):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 2, 16, generator=g)
    kc, vc = torch.randn(1, 8, 1, 16, generator=g), torch.randn(1, 8, 1, 16, generator=g)
    kn, vn = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = _tables(8, 16, gen=g)
    kw = dict(cache_seqlens=3, k_new=kn, v_new=vn, rotary_cos=cos, rotary_sin=sin)
    kw.update(over)
    return fusedattn.decode_attention(q, kc, vc, **kw)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(rotary_sin=None), "rotary_cos and rotary_sin must be given together"),
        (dict(k_new=None, v_new=None), "they need k_new and v_new"),
        (dict(rotary_cos=torch.zeros(8, 9), rotary_sin=torch.zeros(8, 9)), "0 < rotary_dim <= head dim 16"),
        (dict(rotary_cos=torch.zeros(8), rotary_sin=torch.zeros(8)), "rotary_cos must be 2-D"),
        (dict(rotary_sin=torch.zeros(7, 8)), "rotary_sin must have rotary_cos's shape"),
        (dict(rotary_cos=torch.zeros(8, 8, dtype=torch.int64)), "rotary_cos must be a floating-point tensor"),
        (dict(rotary_cos=torch.zeros(3, 8), rotary_sin=torch.zeros(3, 8)), "rotary_cos has 3 positions"),
        (dict(rotary_cos=torch.zeros(8, 8, device="meta")), "rotary_cos must be on q's device"),
    ],
    ids=["one-table", "no-append", "too-wide", "1-D", "shapes", "int", "too-short", "device"],
)
def test_bad_tables(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic):
    g = torch.Generator().manual_seed(2)
    cos, sin = _tables(64, 16, gen=g)

    def f(q, kc, vc, kn, vn, lens):
        return fusedattn.decode_attention(
            q, kc, vc, cache_seqlens=lens, k_new=kn, v_new=vn, rotary_cos=cos, rotary_sin=sin, backend="cpu"
        )

    cf = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for L in (1, 2):
        q = torch.randn(2, L, 2, 16, generator=g)
        kc, vc = torch.randn(2, 40, 1, 16, generator=g), torch.randn(2, 40, 1, 16, generator=g)
        kn, vn = torch.randn(2, L, 1, 16, generator=g), torch.randn(2, L, 1, 16, generator=g)
        lens = torch.tensor([3, 20], dtype=torch.int32)
        kc2 = kc.clone()
        ref = f(q, kc, vc.clone(), kn, vn, lens)
        got = cf(q, kc2, vc.clone(), kn, vn, lens)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(kc2, kc)
