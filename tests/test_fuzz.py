"""Property-based fuzzing of every kernel family against the reference (hypothesis).

attention(): each example draws shapes (B, Hq, Hkv | Hq, Lq, Lk including 0, 1 and odd lengths, D and Dv from 1
to 256), dtype, input layout, mask (none / bool / additive, broadcast shapes, rows that see nothing), causal
alignment, sliding window, softcap and scale, then checks the CPU kernel against the float64 reference under the
2x rule (forward; backward on smaller draws). Invalid draws must raise ValueError from the public function (and
RuntimeError from the raw op).

decode_attention, varlen_attention and merge_attention_states: one test per backend (cpu, triton through the
interpreter with fewer and smaller draws, cuda where built, reference), each drawing contiguous or paged caches
(page sizes 1..64, permuted and shared pages, block-table tails pointing anywhere), cache_batch_idx, in-place
appends (the cache after the call must equal the reference's, slot for slot), Lq > 1, GQA, windows, softcap,
scale, split counts and attention sinks; varlen batches with empty sequences, max_seqlen above every length and
sinks; merges of two partial states in both layouts, sides that saw no key, fp32 partial outputs.

Profiles (registered here, not loaded globally, so other hypothesis tests keep their settings):
  ci    the default, derandomized (CI sees the same examples every run): 205 attention() examples, then per
        backend 200 decode / 150 varlen / 100 merge (25 / 20 / 20 through the Triton interpreter)
  long  FUSEDATTN_FUZZ_PROFILE=long: ~20x as many random examples, database on, so a failure is replayed first
        on the next run

    FUSEDATTN_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fusedattn  # noqa: E402
from conftest import assert_close_2x, grads, randn  # noqa: E402
from test_attention import ref_kwargs, reference_pair, run_kernel  # noqa: E402

fwd_op = torch.ops.fusedattn.attention_fwd

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("long", **_COMMON)
PROFILE = os.environ.get("FUSEDATTN_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"FUSEDATTN_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")


def fuzz_settings(ci_examples: int, long_examples: int):
    """The chosen profile with this test's share of the example budget (ci: ~200 in all)."""
    return settings(settings.get_profile(PROFILE), max_examples=ci_examples if PROFILE == "ci" else long_examples)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Lengths and head dims at and around the kernels' block and vector sizes (VL = 8 / 16, NR = 16 / 32,
# BLOCK_M = 64, BLOCK_N = 64 (bwd) / 256 (fwd)), plus anything in range.
EDGE_LENGTHS = [1, 2, 3, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 255, 256, 257]
EDGE_DIMS = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, 96, 127, 128, 129, 255, 256]


@st.composite
def lengths(draw, max_len: int):
    # 0 about one time in 16 (hypothesis favours boundary values: left alone, half the draws were empty)
    if draw(st.integers(0, 15)) == 0:
        return 0
    return draw(st.one_of(st.sampled_from([x for x in EDGE_LENGTHS if 0 < x <= max_len]), st.integers(1, max_len)))


def dims(max_dim: int = 256):
    return st.one_of(st.sampled_from([x for x in EDGE_DIMS if x <= max_dim]), st.integers(1, max_dim))


@st.composite
def problems(draw, max_len: int = 300, max_dim: int = 256, max_work: float = 4e6):
    """A valid attention problem: a dict of q, k, v and the keyword arguments, plus a description."""
    dtype = draw(st.sampled_from(DTYPES))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.sampled_from([1, 1, 2, 3, 4]))
    B = draw(st.sampled_from([1, 1, 1, 2, 2, 3, 1, 1, 2, 0]))
    D = draw(dims(max_dim))
    Dv = draw(st.one_of(st.just(D), dims(max_dim)))
    Lq, Lk = draw(lengths(max_len)), draw(lengths(max_len))
    # Keep the float64 reference cheap: shrink the batch and heads of big draws (the kernel's blocking depends
    # on L and D, not on B or H).
    if B * Hq * max(Lq, 1) * max(Lk, 1) * max(D, Dv) > max_work:
        B, Hkv, Hq = min(B, 1), 1, draw(st.sampled_from([1, 2]))
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided", "expanded_kv"]))
    amplitude = draw(st.sampled_from([1.0, 1.0, 0.1, 4.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)

    def make(b, h, L, d):
        if layout == "transposed":  # (B, L, H, D) storage
            t = torch.randn(b, L, h, d, generator=g).transpose(1, 2)
        elif layout == "strided":  # every other element of the head dim
            t = torch.randn(b, h, L, 2 * d, generator=g)[..., ::2]
        else:
            t = torch.randn(b, h, L, d, generator=g)
        return (t * amplitude).to(dtype)

    q = make(B, Hq, Lq, D)
    if layout == "expanded_kv":  # one kv head's storage broadcast (stride 0) to Hkv heads
        k = make(B, 1, Lk, D).expand(B, Hkv, Lk, D)
        v = make(B, 1, Lk, Dv).expand(B, Hkv, Lk, Dv)
    else:
        k, v = make(B, Hkv, Lk, D), make(B, Hkv, Lk, Dv)

    causal = draw(st.sampled_from(["none", "bottom_right", "top_left"]))
    side = st.one_of(st.sampled_from([-1, -1, 0, 1, 2, 16, 64]), st.integers(-1, max_len + 2))
    window = draw(st.one_of(st.tuples(side, side), st.just((-1, -1))))
    softcap = draw(st.sampled_from([0.0, 0.0, 0.0, 1.0, 5.0, 30.0]))
    scale = draw(st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False)))

    mask_kind = draw(st.sampled_from(["none", "bool", "additive"]))
    mask = None
    if mask_kind != "none":
        full = (B, Hq, Lq, Lk)
        keep = draw(st.tuples(*[st.sampled_from([True, True, False]) for _ in range(4)]))
        shape = [n if kept else 1 for n, kept in zip(full, keep)]
        drop = draw(st.integers(0, 2))  # leading singleton dims may be left out (broadcast)
        while drop and shape and shape[0] == 1:
            shape, drop = shape[1:], drop - 1
        if mask_kind == "bool":
            mask = torch.rand(shape, generator=g) > draw(st.sampled_from([0.1, 0.5, 0.9]))
        else:
            mask = torch.randn(shape, generator=g) * draw(st.sampled_from([0.5, 3.0]))
            mask[torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.2, 0.6]))] = -math.inf
            mask = mask.to(draw(st.sampled_from([dtype, torch.float32])))
        if draw(st.booleans()) and mask.dim() >= 2 and mask.shape[-2] > 1:  # some rows see nothing
            rows = torch.rand(mask.shape[-2], generator=g) < 0.3
            mask[..., rows, :] = False if mask_kind == "bool" else -math.inf
    desc = dict(
        dtype=str(dtype).replace("torch.", ""),
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Lq=Lq,
        Lk=Lk,
        D=D,
        Dv=Dv,
        layout=layout,
        amplitude=amplitude,
        causal=causal,
        window=window,
        softcap=softcap,
        scale=scale,
        mask=mask_kind,
        mask_shape=None if mask is None else tuple(mask.shape),
        seed=seed,
    )
    return Problem(q, k, v, dict(attn_mask=mask, window=window, softcap=softcap, scale=scale), causal, desc)


class Problem:
    """Tensors and arguments of one draw; its repr (what hypothesis prints for a failing example) is the recipe,
    not the tensors."""

    def __init__(self, q, k, v, kwargs, causal, desc):
        self.q, self.k, self.v, self.kwargs, self.causal, self.desc = q, k, v, kwargs, causal, desc

    def __repr__(self):
        return f"Problem({', '.join(f'{k}={v!r}' for k, v in self.desc.items())})"


# ---------------------------------------------------------------------------------------------- checks
# The 2x rule of tests/test_attention.py, with two allowances that only matter for the draws a grid avoids:
#  * the absolute slack scales with the result's magnitude (amplitude-4 inputs give outputs ~10 and scores ~50,
#    where a fixed 1e-5 is below float32 rounding);
#  * half an ulp of the dtype at that magnitude: a correctly rounded fp16/bf16 result can be that far off, and
#    on a tiny problem the baseline's max error may by luck come from smaller elements only.


def _tol(ref: torch.Tensor, dtype: torch.dtype, rel: float = 1e-5) -> float:
    finite = ref[torch.isfinite(ref)] if ref.numel() else ref
    mag = finite.abs().max().item() if finite.numel() else 0.0
    return rel * max(1.0, mag) + 0.5 * torch.finfo(dtype).eps * mag


def check_forward(q, k, v, causal, **kw):
    out, lse = run_kernel(q, k, v, causal=causal, **kw)
    (ref, ref_lse), (base, base_lse) = reference_pair(q, k, v, **ref_kwargs(causal, **kw))
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_close_2x(out, ref, base, atol=_tol(ref, q.dtype))
    assert_close_2x(lse, ref_lse, base_lse, atol=_tol(ref_lse, torch.float32), name="lse")


def check_backward(q, k, v, causal, gen, use_lse, **kw):
    Bq, Hq, Lq, _ = q.shape
    g_out = randn(Bq, Hq, Lq, v.shape[-1], dtype=q.dtype, gen=gen)
    g_lse = randn(Bq, Hq, Lq, gen=gen) if use_lse else None
    rkw = ref_kwargs(causal, **kw)
    mask = rkw["attn_mask"]
    rkw64 = dict(rkw, attn_mask=mask.double() if mask is not None and mask.is_floating_point() else mask)
    ref = grads(
        lambda *x: fusedattn.attention_ref(*x, return_lse=True, compute_dtype=torch.float64, **rkw64),
        [q.double(), k.double(), v.double()],
        g_out.double(),
        None if g_lse is None else g_lse.double(),
    )
    base = grads(
        lambda *x: fusedattn.attention_ref(*x, return_lse=True, compute_dtype=q.dtype, **rkw), [q, k, v], g_out, g_lse
    )
    got = grads(lambda *x: run_kernel(*x, causal=causal, **kw), [q, k, v], g_out, g_lse)
    # relative to the largest gradient of the three (see test_attention.check_backward: Lk = 1 cancellation)
    scale = max([1.0] + [r.abs().max().item() for r in ref if r.numel()])
    for name, g, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert g.shape == b.shape, name
        atol = 1e-5 * scale + 0.5 * torch.finfo(q.dtype).eps * (r.abs().max().item() if r.numel() else 0.0)
        assert_close_2x(g, r, b, factor=3, atol=atol, name=name)


# ---------------------------------------------------------------------------------------------- properties


@fuzz_settings(ci_examples=120, long_examples=3000)
@given(problems())
def test_forward_matches_reference(p):
    check_forward(p.q, p.k, p.v, p.causal, **p.kwargs)


@fuzz_settings(ci_examples=45, long_examples=1000)
@given(problems(max_len=130, max_dim=128, max_work=5e5), st.booleans())
def test_backward_matches_reference(p, use_lse):
    gen = torch.Generator().manual_seed(p.desc["seed"] ^ 0x5EED)
    check_backward(p.q, p.k, p.v, p.causal, gen, use_lse, **p.kwargs)


# ---------------------------------------------------------------------------------------------- invalid draws

CORRUPTIONS = [
    "batch",
    "head_dim",
    "kv_length",
    "kv_heads_differ",
    "heads_not_divisible",
    "k_dtype",
    "rank",
    "mask_shape",
    "mask_int",
    "window_neg",
    "window_type",
    "window_arity",
    "scale_nan",
    "scale_inf",
    "softcap_neg",
    "softcap_nan",
    "int_inputs",
]
# raised by the raw op as well (the others are Python-level types or arguments the raw op does not take)
RAW_TOO = {
    "batch",
    "head_dim",
    "kv_length",
    "kv_heads_differ",
    "heads_not_divisible",
    "k_dtype",
    "rank",
    "mask_shape",
    "mask_int",
    "window_neg",
    "scale_nan",
    "scale_inf",
    "softcap_neg",
    "softcap_nan",
    "int_inputs",
}


@fuzz_settings(ci_examples=40, long_examples=800)
@given(problems(max_len=40, max_dim=40), st.sampled_from(CORRUPTIONS), st.integers(0, 2**16))
def test_invalid_draws_raise(p, corruption, r):
    q, k, v = p.q, p.k, p.v
    kw = dict(p.kwargs)
    causal = p.causal
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if corruption == "batch":
        Bk = B + 1 + r % 2
        k, v = torch.zeros(Bk, Hkv, Lk, D, dtype=q.dtype), torch.zeros(Bk, Hkv, Lk, Dv, dtype=q.dtype)
    elif corruption == "head_dim":
        k = torch.zeros(B, Hkv, Lk, D + 1 + r % 3, dtype=q.dtype)
    elif corruption == "kv_length":
        v = torch.zeros(B, Hkv, Lk + 1 + r % 3, Dv, dtype=q.dtype)
    elif corruption == "kv_heads_differ":
        v = torch.zeros(B, Hkv + 1, Lk, Dv, dtype=q.dtype)
    elif corruption == "heads_not_divisible":
        bad = [h for h in range(2, Hq + 3) if Hq % h]
        h = bad[r % len(bad)]
        k, v = torch.zeros(B, h, Lk, D, dtype=q.dtype), torch.zeros(B, h, Lk, Dv, dtype=q.dtype)
    elif corruption == "k_dtype":
        other = [d for d in DTYPES if d != q.dtype]
        k = k.to(other[r % 2])
    elif corruption == "rank":
        q = q.reshape(B * Hq, Lq, D) if r % 2 else q[None]
    elif corruption == "mask_shape":
        full = [B, Hq, Lq, Lk]
        d = r % 4
        full[d] = full[d] + 2  # never 1: does not broadcast
        kw["attn_mask"] = torch.zeros(full)
    elif corruption == "mask_int":
        kw["attn_mask"] = torch.zeros(Lq, Lk, dtype=[torch.int32, torch.int64, torch.uint8][r % 3])
    elif corruption == "window_neg":
        kw["window"] = (-2 - r, -1) if r % 2 else (0, -2 - r)
    elif corruption == "window_type":
        kw["window"] = [(1.5, 0), (0, "2"), (True, 1), None, 3][r % 5]
    elif corruption == "window_arity":
        kw["window"] = (1, 2, 3) if r % 2 else (4,)
    elif corruption == "scale_nan":
        kw["scale"] = math.nan
    elif corruption == "scale_inf":
        kw["scale"] = math.inf if r % 2 else -math.inf
    elif corruption == "softcap_neg":
        kw["softcap"] = -(r + 1) / 7
    elif corruption == "softcap_nan":
        kw["softcap"] = math.nan
    elif corruption == "int_inputs":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    with pytest.raises(ValueError):
        fusedattn.attention(q, k, v, causal=causal == "bottom_right", backend="cpu", **kw)
    if corruption in RAW_TOO:
        window = kw["window"]
        mask = kw["attn_mask"]
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
        scale = 1.0 if kw["scale"] is None else kw["scale"]
        with pytest.raises(RuntimeError, match="fusedattn"):
            fwd_op(q, k, v, mask, scale, window[0], window[1], causal != "top_left", kw["softcap"])


# ---------------------------------------------------------------------------------------------- decode, varlen, merge
# One test per (family, backend): each draws its problems with hypothesis under the profile above; the Triton
# interpreter (numpy on the CPU) gets fewer, smaller draws. A draw the backend cannot serve (dispatch's
# unsupported reason) is rejected with assume(), as the grids skip it.

from fusedattn import dispatch  # noqa: E402
from fusedattn.reference import attention_ref, decode_attention_ref, merge_attention_states_ref  # noqa: E402
from conftest import backend_params, device_for, interpreted, max_abs_err  # noqa: E402
from test_varlen import cu, ref_call, run  # noqa: E402

hypothesis_assume = hypothesis.assume


def _decode_call(fn, x, dtype=None, **kw):
    """fn(q, k_cache, v_cache, **the rest) on fresh copies of x (the append writes the caches), floating
    tensors cast to `dtype`; returns (out, lse, k_cache after, v_cache after)."""
    x = {
        n: None if t is None else (t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone())
        for n, t in x.items()
    }
    q, kc, vc = x.pop("q"), x.pop("k_cache"), x.pop("v_cache")
    out, lse = fn(q, kc, vc, **x, **kw, return_lse=True)
    return out.cpu(), lse.cpu(), kc.cpu(), vc.cpu()


def check_decode(x, backend, num_splits, **kw):
    """decode_attention on `backend` vs the float64 reference under the 2x rule; the append wrote exactly the
    reference's slots (and nothing else)."""
    dev = device_for(backend)
    xd = {n: None if t is None else t.to(dev) for n, t in x.items()}
    kw_dev = dict(kw, sinks=None if kw.get("sinks") is None else kw["sinks"].to(dev))
    out, lse, k_after, v_after = _decode_call(
        fusedattn.decode_attention, xd, backend=backend, num_splits=num_splits, **kw_dev
    )
    ref, ref_lse, _, _ = _decode_call(decode_attention_ref, x, torch.float64, compute_dtype=torch.float64, **kw)
    dtype = x["q"].dtype
    base, base_lse, k_ref, v_ref = _decode_call(decode_attention_ref, x, compute_dtype=dtype, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    # Triton rounds P to the input dtype before P @ V (as FlashAttention does; kernels/decode.py): one ulp of
    # the output's magnitude, not half, where the baseline is exact by luck (e.g. bf16, two keys, D = 9).
    ulp = 2.0 if backend == "triton" else 1.0
    assert_close_2x(out, ref, base, atol=ulp * _tol(ref, dtype))
    assert_close_2x(lse, ref_lse, base_lse, atol=_tol(ref_lse, torch.float32), name="lse")
    assert max_abs_err(k_after, k_ref) == 0 and max_abs_err(v_after, v_ref) == 0


def budget(backend: str, ci: int, ci_interpreted: int, long: int):
    """The examples of one (family, backend) test: fewer through the Triton interpreter."""
    return fuzz_settings(ci_interpreted if interpreted(backend) else ci, long // 4 if interpreted(backend) else long)


def supported(family: str, backend: str, dtype, D: int, Dv: int, softcap: float) -> bool:
    case = dispatch.Case(torch.device(device_for(backend)), dtype, D, Dv, softcap=softcap)
    return dispatch.unsupported_reason(family, backend, case) is None


def _draw_sinks(draw, Hq: int, g: torch.Generator):
    """None (most draws) or (Hq,) attention sinks in float32, around the scores' range."""
    if draw(st.integers(0, 2)) != 0:
        return None
    return torch.randn(Hq, generator=g) * draw(st.sampled_from([1.0, 4.0]))


def windows(max_side: int):
    side = st.one_of(st.sampled_from([-1, -1, 0, 1, 2, 16]), st.integers(-1, max_side))
    return st.one_of(st.just((-1, -1)), st.tuples(side, side))


@st.composite
def decode_problems(draw, small: bool):
    """A valid decode_attention call: contiguous or paged cache (page sizes 1 .. 64, permuted pages, pages
    shared between sequences when nothing is appended), lengths from 0 up to the capacity, an in-place append
    of Lnew rows into slots no other sequence writes, cache_batch_idx, Lq > 1, GQA, windows, softcap, splits."""
    max_len = 40 if small else 300
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 2 if small else 4))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2, 4]))
    D = draw(dims(32 if small else 256))
    Dv = draw(st.one_of(st.just(D), dims(32 if small else 256)))
    Lq = draw(st.sampled_from([1, 1, 2, 3, 5]))
    Lnew = draw(st.sampled_from([0, 0, 1, 2, 4]))
    total = [draw(st.one_of(st.just(0), lengths(max_len))) for _ in range(B)]
    total = [max(t, Lnew) for t in total]  # the append needs Lnew slots
    cached = [t - Lnew for t in total]
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    paged = draw(st.booleans())
    block_table = cache_batch_idx = None
    if paged:
        page = draw(st.sampled_from([1, 2, 3, 7, 16, 17, 64]))
        pages = [-(-t // page) for t in total]
        shared = Lnew == 0 and draw(st.booleans())
        width = max(pages + [1]) + draw(st.integers(0, 2))
        if shared:  # every sequence reads from one small pool of pages, in any order, repeats allowed
            num_blocks = max(max(pages + [1]), draw(st.integers(1, 6)))
            table = torch.randint(0, num_blocks, (B, width), generator=g, dtype=torch.int32)
        else:  # disjoint permuted pages; the unused tail of a row points anywhere
            num_blocks = sum(pages) + draw(st.integers(0, 3)) + 1
            order = torch.randperm(num_blocks, generator=g)
            table = torch.randint(0, num_blocks, (B, width), generator=g, dtype=torch.int32)
            start = 0
            for b in range(B):
                table[b, : pages[b]] = order[start : start + pages[b]].to(torch.int32)
                start += pages[b]
        block_table = table
        shape_k, shape_v = (num_blocks, page, Hkv, D), (num_blocks, page, Hkv, Dv)
        desc_cache = dict(page=page, num_blocks=num_blocks, shared=shared)
    else:
        L_max = max(total + [1]) + draw(st.integers(0, 5))
        rows = B + draw(st.integers(0, 2))
        if draw(st.integers(0, 2)) != 0:  # (booleans() came out False in ~9 of 10 derandomized draws)
            perm = torch.randperm(rows, generator=g)[:B]
            if Lnew == 0 and draw(st.booleans()):  # repeated rows are fine when nothing is written
                perm = torch.randint(0, rows, (B,), generator=g)
            cache_batch_idx = perm.to(torch.int32)
        elif rows != B:
            rows = B
        shape_k, shape_v = (rows, L_max, Hkv, D), (rows, L_max, Hkv, Dv)
        desc_cache = dict(L_max=L_max, rows=rows, cache_batch_idx=cache_batch_idx is not None)
    inputs = dict(
        q=torch.randn(B, Lq, Hq, D, generator=g).to(dtype),
        k_cache=torch.randn(shape_k, generator=g).to(dtype),
        v_cache=torch.randn(shape_v, generator=g).to(dtype),
        cache_seqlens=torch.tensor(cached, dtype=torch.int32),
        k_new=torch.randn(B, Lnew, Hkv, D, generator=g).to(dtype) if Lnew else None,
        v_new=torch.randn(B, Lnew, Hkv, Dv, generator=g).to(dtype) if Lnew else None,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
    )
    kw = dict(
        causal=draw(st.booleans()),
        window=draw(windows(max_len + 2)),
        softcap=draw(st.sampled_from([0.0, 0.0, 1.0, 30.0])),
        scale=draw(st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False))),
        num_splits=draw(st.sampled_from([0, 0, 1, 2, 3, 7, 64])),
        sinks=_draw_sinks(draw, Hq, g),
    )
    desc = dict(
        dtype=str(dtype).replace("torch.", ""), B=B, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, Lq=Lq, Lnew=Lnew, lengths=total
    )
    return Problem(inputs, None, None, kw, None, dict(desc, **desc_cache, **kw, seed=seed))


@pytest.mark.parametrize("backend", backend_params())
def test_decode_matches_reference(backend):
    @budget(backend, ci=200, ci_interpreted=25, long=4000)
    @given(decode_problems(small=interpreted(backend)))
    def prop(p):
        x = p.q
        hypothesis_assume(
            supported("decode", backend, x["q"].dtype, x["q"].shape[-1], x["v_cache"].shape[-1], p.kwargs["softcap"])
        )
        check_decode(x, backend, **p.kwargs)

    prop()


@st.composite
def varlen_problems(draw, small: bool):
    """A valid varlen_attention call: 0 .. 5 sequences of query / key lengths from 0 (empty sequences, empty
    batches) upwards, GQA, D != Dv, causal or not, windows, softcap, scale."""
    max_len = 24 if small else 200
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 3 if small else 5))
    seqs = [(draw(lengths(max_len)), draw(lengths(max_len))) for _ in range(n)]
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3]))
    D = draw(dims(32 if small else 128))
    Dv = draw(st.one_of(st.just(D), dims(32 if small else 128)))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    lq, lk = [a for a, _ in seqs], [b for _, b in seqs]
    extra = draw(st.sampled_from([0, 0, 3]))  # max_seqlen may exceed every length
    x = dict(
        q=torch.randn(sum(lq), Hq, D, generator=g).to(dtype),
        k=torch.randn(sum(lk), Hkv, D, generator=g).to(dtype),
        v=torch.randn(sum(lk), Hkv, Dv, generator=g).to(dtype),
        cu_seqlens_q=cu(lq),
        cu_seqlens_k=cu(lk),
        max_seqlen_q=max(lq, default=0) + extra,
        max_seqlen_k=max(lk, default=0) + extra,
    )
    kw = dict(
        causal=draw(st.booleans()),
        window=draw(windows(max_len + 2)),
        softcap=draw(st.sampled_from([0.0, 0.0, 1.0, 30.0])),
        scale=draw(st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False))),
        sinks=_draw_sinks(draw, Hq, g),
    )
    desc = dict(dtype=str(dtype).replace("torch.", ""), seqs=seqs, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, extra=extra)
    return Problem(x, None, None, kw, None, dict(desc, **kw, seed=seed))


@pytest.mark.parametrize("backend", backend_params())
def test_varlen_matches_reference(backend):
    @budget(backend, ci=150, ci_interpreted=20, long=3000)
    @given(varlen_problems(small=interpreted(backend)))
    def prop(p):
        x = p.q
        hypothesis_assume(
            supported("varlen", backend, x["q"].dtype, x["q"].shape[-1], x["v"].shape[-1], p.kwargs["softcap"])
        )
        dev = device_for(backend)
        x = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
        sinks = p.kwargs["sinks"]
        out, lse = run(backend, x, **dict(p.kwargs, sinks=None if sinks is None else sinks.to(dev)))
        ref, ref_lse = ref_call(x, torch.float64, **p.kwargs)
        base, base_lse = ref_call(x, x["q"].dtype, **p.kwargs)
        assert out.shape == base.shape and out.dtype == x["q"].dtype
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        assert_close_2x(out.cpu(), ref, base, atol=_tol(ref, x["q"].dtype))
        assert_close_2x(lse.cpu(), ref_lse, base_lse, atol=_tol(ref_lse, torch.float32), name="lse")

    prop()


@st.composite
def merge_problems(draw, small: bool):
    """Two attention states over a random partition of the keys (per batch, head and key; a side may get no
    key at all for some or every row: lse -inf there), in layout blhd or bhld, out_dtype None or float32."""
    dtype = draw(st.sampled_from(DTYPES))
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    L, Lk = draw(lengths(17 if small else 70)), draw(st.integers(1, 20 if small else 90))
    D = draw(dims(32 if small else 256))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    p_a = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    in_a = torch.rand(B, H, 1, Lk, generator=g) < p_a
    if draw(st.booleans()) and L:  # some rows see no key on one side
        rows = torch.rand(L, generator=g) < 0.3
        side = torch.rand(L, generator=g) < 0.5
        keep_a = torch.where(rows[:, None], side[:, None].expand(L, Lk), torch.ones(L, Lk, dtype=torch.bool))
        keep_b = torch.where(rows[:, None], ~side[:, None].expand(L, Lk), torch.ones(L, Lk, dtype=torch.bool))
    else:
        keep_a = keep_b = torch.ones(L, Lk, dtype=torch.bool)
    scale = draw(st.sampled_from([1.0, 3.0]))  # a spread of lse values
    q = (torch.randn(B, H, L, D, generator=g) * scale).to(dtype)
    k, v = torch.randn(B, H, Lk, D, generator=g).to(dtype), torch.randn(B, H, Lk, D, generator=g).to(dtype)
    states = []
    for mask in (in_a & keep_a, ~in_a & keep_b):
        o, lse = attention_ref(q, k, v, attn_mask=mask, return_lse=True)
        states += [o.to(dtype), lse.float()]
    layout = draw(st.sampled_from(["blhd", "bhld"]))
    out_dtype = draw(st.sampled_from([None, None, torch.float32]))
    desc = dict(dtype=str(dtype).replace("torch.", ""), B=B, H=H, L=L, Lk=Lk, D=D, p_a=p_a, layout=layout, seed=seed)
    return Problem(states, None, None, dict(layout=layout, out_dtype=out_dtype), None, dict(desc, out_dtype=out_dtype))


@pytest.mark.parametrize("backend", backend_params())
def test_merge_matches_reference(backend):
    @budget(backend, ci=100, ci_interpreted=20, long=2000)
    @given(merge_problems(small=interpreted(backend)))
    def prop(p):
        out_a, lse_a, out_b, lse_b = p.q  # (B, H, L, D) outputs, (B, H, L) lse
        D, layout, out_dtype = out_a.shape[-1], p.kwargs["layout"], p.kwargs["out_dtype"]
        hypothesis_assume(supported("merge", backend, out_a.dtype, D, D, 0.0))
        dev = device_for(backend)
        if layout == "blhd":
            a, b = out_a.transpose(1, 2).contiguous(), out_b.transpose(1, 2).contiguous()
        else:
            a, b = out_a, out_b
        out, lse = fusedattn.merge_attention_states(
            a.to(dev), lse_a.to(dev), b.to(dev), lse_b.to(dev), layout=layout, out_dtype=out_dtype, backend=backend
        )
        out, lse = out.cpu(), lse.cpu()
        if layout == "bhld":
            out = out.transpose(1, 2)
        # the reference takes (B, L, H, D)
        ra, rb = out_a.transpose(1, 2), out_b.transpose(1, 2)
        ref, ref_lse = merge_attention_states_ref(ra.double(), lse_a, rb.double(), lse_b, compute_dtype=torch.float64)
        cdt = out_dtype or out_a.dtype
        base, base_lse = merge_attention_states_ref(ra.to(cdt), lse_a, rb.to(cdt), lse_b, compute_dtype=cdt)
        assert out.dtype == cdt and lse.dtype == torch.float32
        assert_close_2x(out, ref, base.to(cdt), atol=_tol(ref, cdt))
        assert_close_2x(lse, ref_lse, base_lse.float(), atol=_tol(ref_lse, torch.float32), name="lse")
        empty = lse_a.isinf() & lse_b.isinf()  # no key on either side: output 0, lse -inf
        assert (out.transpose(1, 2)[empty] == 0).all() and (lse[empty] == -math.inf).all()

    prop()
