"""Left-padded KV caches: ``decode_attention(cache_leftpad=)`` (flash_attn_with_kvcache's ``cache_leftpad``) on
every backend against the reference: keys before cache_leftpad[b] are never read, the append writes at
cache_seqlens, causal / window align on the valid keys, with cache_batch_idx and rotary; bad inputs; compile."""

from __future__ import annotations

import math

import pytest
import torch

import fusedattn
from conftest import assert_close_2x, backend_cases, device_for, randn, skip_unsupported
from fusedattn.reference import decode_attention_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

CASES = [
    dict(B=3, Lq=1, Lnew=1, Hq=8, Hkv=2, D=64, L_max=120, ends=[0, 17, 97], pads=[0, 5, 40], causal=True),
    dict(B=2, Lq=3, Lnew=3, Hq=4, Hkv=4, D=128, L_max=80, ends=[33, 70], pads=[33, 1], causal=True, cbi=[1, 0]),
    dict(B=2, Lq=2, Lnew=0, Hq=2, Hkv=1, D=80, L_max=50, ends=[9, 40], pads=[3, 39], causal=False, window=(4, 1)),
    dict(B=2, Lq=2, Lnew=2, Hq=2, Hkv=1, D=32, L_max=64, ends=[10, 50], pads=[2, 7], causal=True, rotary=16),
]
SMALL = [
    dict(B=2, Lq=2, Lnew=2, Hq=2, Hkv=1, D=16, L_max=16, ends=[3, 9], pads=[1, 4], causal=True, rotary=8),
    dict(B=2, Lq=1, Lnew=0, Hq=2, Hkv=2, D=16, L_max=12, ends=[5, 0], pads=[5, 0], causal=False, cbi=[2, 0]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend,case", backend_cases(CASES, SMALL))
def test_decode_leftpad(backend, case, dtype, gen):
    skip_unsupported("decode", backend, dtype=dtype, head_dim=case["D"])
    B, Lq, Lnew, Hq, Hkv, D, L_max = (case[n] for n in ("B", "Lq", "Lnew", "Hq", "Hkv", "D", "L_max"))
    dev = device_for(backend)
    rows = B + (1 if "cbi" in case else 0)
    kc, vc = randn(rows, L_max, Hkv, D, gen=gen), randn(rows, L_max, Hkv, D, gen=gen)
    q = randn(B, Lq, Hq, D, gen=gen)
    kn = randn(B, Lnew, Hkv, D, gen=gen) if Lnew else None
    vn = randn(B, Lnew, Hkv, D, gen=gen) if Lnew else None
    extra = dict(causal=case["causal"], window=case.get("window", (-1, -1)))
    if "cbi" in case:
        extra["cache_batch_idx"] = torch.tensor(case["cbi"], dtype=torch.int32)
    if "rotary" in case:
        angle = torch.rand(L_max, case["rotary"] // 2, generator=gen) * 2 * math.pi
        extra.update(rotary_cos=angle.cos(), rotary_sin=angle.sin())
    ends, pads = torch.tensor(case["ends"], dtype=torch.int32), torch.tensor(case["pads"], dtype=torch.int32)

    def run(fn, cdt, dev="cpu", **more):
        kcc, vcc = kc.to(dev, cdt), vc.to(dev, cdt)
        kw = {
            n: (x.to(dev, cdt) if x.is_floating_point() else x.to(dev)) for n, x in extra.items() if torch.is_tensor(x)
        }
        kw.update({n: x for n, x in extra.items() if not torch.is_tensor(x)})
        out, lse = fn(
            q.to(dev, cdt),
            kcc,
            vcc,
            k_new=None if kn is None else kn.to(dev, cdt),
            v_new=None if vn is None else vn.to(dev, cdt),
            cache_seqlens=ends.to(dev),
            cache_leftpad=pads.to(dev),
            return_lse=True,
            **kw,
            **more,
        )
        return out.cpu(), lse.cpu(), kcc.cpu(), vcc.cpu()

    with torch.no_grad():
        out, lse, k_after, v_after = run(fusedattn.decode_attention, dtype, dev, backend=backend)
        r_out, r_lse, r_k, r_v = run(decode_attention_ref, torch.float64, compute_dtype=torch.float64)
        b_out, b_lse, b_k, b_v = run(decode_attention_ref, dtype, compute_dtype=dtype)
    assert_close_2x(out, r_out, b_out)
    assert_close_2x(lse, r_lse, b_lse.float(), name="lse")
    assert_close_2x(k_after, r_k, b_k, name="k_cache")  # the append wrote at cache_seqlens, nowhere else
    assert torch.equal(v_after, b_v)
    empty = (ends == pads) & (Lnew == 0)  # no valid key: 0 and -inf
    assert (out[empty] == 0).all() and (lse[empty] == -math.inf).all()


def test_padding_is_never_read():
    """NaN in the padding (and past the end) changes nothing: those positions are not read."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 2, 16, generator=g)
    kc, vc = torch.randn(2, 20, 1, 16, generator=g), torch.randn(2, 20, 1, 16, generator=g)
    ends, pads = torch.tensor([12, 20], dtype=torch.int32), torch.tensor([4, 9], dtype=torch.int32)
    ref = fusedattn.decode_attention(q, kc, vc, cache_seqlens=ends, cache_leftpad=pads)
    for b in range(2):
        kc[b, : pads[b]] = float("nan")
        vc[b, : pads[b]] = float("nan")
        kc[b, ends[b] :] = float("nan")
    got = fusedattn.decode_attention(q, kc, vc, cache_seqlens=ends, cache_leftpad=pads)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    # and equals attending over the valid slice alone
    for b in range(2):
        alone = fusedattn.decode_attention(
            q[b : b + 1], kc[b : b + 1, pads[b] :], vc[b : b + 1, pads[b] :], cache_seqlens=int(ends[b] - pads[b])
        )
        torch.testing.assert_close(got[b : b + 1], alone, atol=1e-6, rtol=1e-5)


def test_flash_attn_interface_passes_it():
    from fusedattn import flash_attn_interface as fai

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 2, 16, generator=g)
    kc, vc = torch.randn(2, 20, 1, 16, generator=g), torch.randn(2, 20, 1, 16, generator=g)
    ends, pads = torch.tensor([12, 20], dtype=torch.int32), torch.tensor([4, 9], dtype=torch.int32)
    got = fai.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=ends, cache_leftpad=pads, causal=True)
    torch.testing.assert_close(got, fusedattn.decode_attention(q, kc, vc, cache_seqlens=ends, cache_leftpad=pads))


def _call(**over):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 2, 16, generator=g)
    kc, vc = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 8, 1, 16, generator=g)
    kw = dict(
        cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), cache_leftpad=torch.tensor([1, 2], dtype=torch.int32)
    )
    kw.update(over)
    k_cache = kw.pop("k_cache", kc)
    return fusedattn.decode_attention(q, k_cache, kw.pop("v_cache", vc), **kw)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(cache_leftpad=torch.tensor([1, 2])), "cache_leftpad must be an int32 tensor"),
        (dict(cache_leftpad=torch.tensor([1], dtype=torch.int32)), r"cache_leftpad must have shape \(B,\)"),
        (dict(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)), r"cache_leftpad\[0\] = 4 must be in \[0, "),
        (dict(cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32)), r"cache_leftpad\[0\] = -1"),
        (
            dict(
                k_cache=torch.zeros(4, 2, 1, 16),
                v_cache=torch.zeros(4, 2, 1, 16),
                block_table=torch.zeros(2, 4, dtype=torch.int32),
            ),
            "cache_leftpad is for contiguous caches",
        ),
        (
            dict(k_cache=torch.zeros(2, 2, 8, 16).transpose(1, 2), v_cache=torch.zeros(2, 2, 8, 16).transpose(1, 2)),
            "cache_leftpad needs k_cache positions laid out one after another",
        ),
    ],
    ids=["dtype", "shape", "past-end", "negative", "paged", "layout"],
)
def test_bad_leftpad(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph(dynamic):
    g = torch.Generator().manual_seed(3)

    def f(q, kc, vc, ends, pads):
        return fusedattn.decode_attention(q, kc, vc, cache_seqlens=ends, cache_leftpad=pads, backend="cpu")

    cf = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for L in (24, 40):
        q = torch.randn(2, 1, 2, 16, generator=g)
        kc, vc = torch.randn(2, L, 1, 16, generator=g), torch.randn(2, L, 1, 16, generator=g)
        ends, pads = torch.tensor([10, L], dtype=torch.int32), torch.tensor([3, 7], dtype=torch.int32)
        torch.testing.assert_close(cf(q, kc, vc, ends, pads), f(q, kc, vc, ends, pads))
