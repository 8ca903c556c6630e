"""KV-cache decoding (fusedattn.decode_attention, merge_attention_states, the KV-cache helpers) against the reference
under FlashAttention's 2x rule.

The main grid is pairwise over dtype x page size x Lq x GQA ratio x head dim x split count x append, each case one
batch whose sequences have all the lengths {1, 7, 255, 256, 257, 4097} (cached + appended). Cache slots beyond a
sequence's length hold NaN and block-table entries beyond its last page are out of range, so any read past the
end shows up in the output (or as a crash).

Every test that runs a kernel runs on every backend of tests/conftest.py: "cpu" (C++), "triton" (kernels/decode.py;
on a GPU, or on CPU tensors under TRITON_INTERPRET=1, where the grid is reduced to keep the interpreter's time
small: lengths {1, 7, 255, 257}, page sizes {1, 16, 48, 64}), "cuda" (csrc/cuda) and "reference"; a case a
backend cannot serve is skipped with the dispatcher's reason.
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
    case_id,
    device_for,
    interpreted,
    max_abs_err,
    pairwise,
    randn,
    raw_op,
    skip_unsupported,
    unavailable_reason,
)
from fusedattn.reference import attention_ref, decode_attention_ref, merge_attention_states_ref
from fusedattn.transformer.kv_cache import KVCache, PagedKVCache

decode_op = torch.ops.fusedattn.decode_fwd
merge_op = torch.ops.fusedattn.merge_attention_states

TRITON_REASON = unavailable_reason("triton")  # None: the Triton decode ops are registered
INTERPRET = interpreted("triton")
TRITON_DEVICE = device_for("triton")
skip_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
FUSED = backend_params(FUSED_BACKENDS)  # the backends with raw ops (opcheck, torch.compile, the ops' own checks)

LENGTHS = [1, 7, 255, 256, 257, 4097]  # keys per sequence after the append, all in one batch
HKV = 2
GRID = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
        "page": [None, 1, 16, 64, 256],  # None: contiguous cache
        "Lq": [1, 4],
        "gqa": [1, 4, 8],  # Hq / Hkv
        "D": [64, 128, 256],
        "splits": [1, 2, 7, 0],  # 0: heuristic
        "Lnew": [0, 3],  # rows appended in place before attending
    }
)
UNUSED_PAGE = -7  # block-table entries past a sequence's last page: out of range on purpose
# The interpreter runs Triton kernels as numpy, ~1 s per call: a reduced grid (non-power-of-2 page size included).
TRITON_LENGTHS = [1, 7, 255, 257]
TRITON_GRID = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
        "page": [None, 1, 16, 48, 64],
        "Lq": [1, 4],
        "gqa": [1, 4],
        "D": [64, 128],
        "splits": [1, 2, 7, 0],
        "Lnew": [0, 3],
    }
)
# At the CUDA kernels' dtypes (bf16 / fp16): its own pairwise grid, so that their cases meet every factor too.
HALF_GRID = pairwise(
    {
        "dtype": [torch.bfloat16, torch.float16],
        "page": [None, 1, 16, 64, 256],
        "Lq": [1, 4],
        "gqa": [1, 4, 8],
        "D": [64, 128, 256],
        "splits": [1, 2, 7, 0],
        "Lnew": [0, 3],
    }
)
# Every backend outside the interpreter: the grid, a non-power-of-2 page size, and the half-precision grid.
FULL_GRID = GRID + [dict(c, page=48) for c in GRID[:4]] + [c for c in HALF_GRID if c not in GRID]


# ---------------------------------------------------------------------------------------------- helpers


def make_batch(
    gen, lengths, *, Lq=1, Hq=4, Hkv=HKV, D=32, Dv=None, dtype=torch.float32, page=None, Lnew=0, spare_rows=5
):
    """Sequences with `lengths` keys after appending Lnew rows, in a contiguous (B, L_max, Hkv, D) or paged
    (num_blocks, page, Hkv, D) cache with a shuffled block table. Unused cache slots are NaN."""
    Dv = Dv or D
    B = len(lengths)
    cached = [max(L - Lnew, 0) for L in lengths]
    total = [c + Lnew for c in cached]
    keys = [randn(t, Hkv, D, dtype=dtype, gen=gen) for t in total]  # (L_b, Hkv, D)
    values = [randn(t, Hkv, Dv, dtype=dtype, gen=gen) for t in total]
    q = randn(B, Lq, Hq, D, dtype=dtype, gen=gen)
    if page is None:
        L_max = max(total, default=0) + spare_rows
        k_cache = torch.full((B, L_max, Hkv, D), math.nan, dtype=dtype)
        v_cache = torch.full((B, L_max, Hkv, Dv), math.nan, dtype=dtype)
        block_table = None
        for b in range(B):
            k_cache[b, : cached[b]] = keys[b][: cached[b]]
            v_cache[b, : cached[b]] = values[b][: cached[b]]
    else:
        pages = [-(-t // page) for t in total]
        num_blocks = sum(pages) + 3
        order = torch.randperm(num_blocks, generator=gen).tolist()
        block_table = torch.full((B, max(pages) + 1), UNUSED_PAGE, dtype=torch.int32)
        k_cache = torch.full((num_blocks, page, Hkv, D), math.nan, dtype=dtype)
        v_cache = torch.full((num_blocks, page, Hkv, Dv), math.nan, dtype=dtype)
        for b in range(B):
            block_table[b, : pages[b]] = torch.tensor([order.pop() for _ in range(pages[b])], dtype=torch.int32)
            for j in range(cached[b]):
                blk = int(block_table[b, j // page])
                k_cache[blk, j % page] = keys[b][j]
                v_cache[blk, j % page] = values[b][j]
    k_new = v_new = None
    if Lnew:
        k_new = torch.stack([keys[b][cached[b] :] for b in range(B)]) if B else torch.zeros(0, Lnew, Hkv, D)
        v_new = torch.stack([values[b][cached[b] :] for b in range(B)]) if B else torch.zeros(0, Lnew, Hkv, Dv)
    return dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        cache_seqlens=torch.tensor(cached, dtype=torch.int32),
        k_new=k_new,
        v_new=v_new,
        block_table=block_table,
    )


def clone_inputs(inputs, dtype=None):
    """Fresh copies (the caches are written in place), optionally cast to `dtype` (floating tensors only)."""

    def cp(t):
        if t is None:
            return None
        t = t.clone()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return {name: cp(t) for name, t in inputs.items()}


def on(x, device):
    """The inputs dict moved to `device`."""
    return {name: (t.to(device) if t is not None else None) for name, t in x.items()}


def _call(fn, x, kw):
    """fn(q, k_cache, v_cache, **the other inputs, **kw) for decode_attention and decode_attention_ref."""
    args = dict(x)
    q, k_cache, v_cache = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    return fn(q, k_cache, v_cache, **args, **kw)


def reference_pair(inputs, **kw):
    """((ref, ref_lse), (base, base_lse), ref caches after the append): float64 ground truth from float64
    inputs, and the same math in the input dtype."""
    x64 = clone_inputs(inputs, torch.float64)
    ref = _call(decode_attention_ref, x64, dict(kw, return_lse=True, compute_dtype=torch.float64))
    xb = clone_inputs(inputs)
    base = _call(decode_attention_ref, xb, dict(kw, return_lse=True, compute_dtype=inputs["q"].dtype))
    return ref, base, (xb["k_cache"], xb["v_cache"])


def run_decode(inputs, backend, device=None, **kw):
    """decode_attention on fresh copies of `inputs` (on the backend's device); returns (results on the CPU,
    the caches after the call on the CPU)."""
    skip_unsupported(
        "decode",
        backend,
        dtype=inputs["q"].dtype,
        head_dim=inputs["q"].shape[-1],
        value_dim=inputs["v_cache"].shape[-1],
        softcap=kw.get("softcap", 0.0),
    )
    x = on(clone_inputs(inputs), device or device_for(backend))
    res = _call(fusedattn.decode_attention, x, dict(kw, backend=backend))
    res = tuple(r.cpu() for r in res) if isinstance(res, tuple) else res.cpu()
    return res, (x["k_cache"].cpu(), x["v_cache"].cpu())


def check_decode(inputs, backend="cpu", **kw):
    (out, lse), (k_out, v_out) = run_decode(inputs, backend, **kw, return_lse=True)
    (ref, ref_lse), (base, base_lse), (k_after, v_after) = reference_pair(
        inputs, **{k: v for k, v in kw.items() if k != "num_splits"}
    )
    assert out.shape == ref.shape and out.dtype == inputs["q"].dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_close_2x(out, ref, base)
    assert_close_2x(lse, ref_lse, base_lse, name="lse")
    # The append wrote exactly the reference's rows (NaN = untouched slots on both sides).
    assert max_abs_err(k_out, k_after) == 0 and max_abs_err(v_out, v_after) == 0
    return out, lse


# ---------------------------------------------------------------------------------------------- main grid


@pytest.mark.parametrize("backend,case", backend_cases(FULL_GRID, TRITON_GRID))
def test_decode_vs_reference(backend, case, gen):
    lengths = TRITON_LENGTHS if interpreted(backend) else LENGTHS
    inputs = make_batch(
        gen,
        lengths,
        Lq=case["Lq"],
        Hq=HKV * case["gqa"],
        D=case["D"],
        dtype=case["dtype"],
        page=case["page"],
        Lnew=case["Lnew"],
    )
    check_decode(inputs, backend, num_splits=case["splits"])


@pytest.mark.parametrize(
    "case",
    pairwise(
        {
            "window": [(16, 0), (0, 0), (100, -1), (-1, 2)],
            "causal": [True, False],
            "page": [None, 16],
            "softcap": [0.0, 5.0],
        }
    ),
    ids=case_id,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_softcap_scale(case, gen, backend, dtype):
    if interpreted(backend) and dtype != torch.float32:
        pytest.skip("outside the reduced grid run under TRITON_INTERPRET=1")
    inputs = make_batch(gen, [3, 40, 300], Lq=4, Hq=8, D=64, dtype=dtype, page=case["page"], Lnew=2)
    inputs["q"] = inputs["q"] * 3  # large scores so that the cap bites
    check_decode(
        inputs, backend, causal=case["causal"], window=case["window"], softcap=case["softcap"], scale=0.2, num_splits=3
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_head_dim_differs(gen, dtype, backend):
    inputs = make_batch(gen, [5, 70, 129], Lq=2, Hq=6, Hkv=3, D=40, Dv=72, dtype=dtype, page=8, Lnew=1)
    check_decode(inputs, backend, num_splits=2)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 32), (torch.bfloat16, 64)])
def test_cache_batch_idx(gen, backend, dtype, D):
    """Sequences read (and append to) the cache rows cache_batch_idx names; other rows are untouched."""
    if interpreted(backend) and dtype != torch.float32:
        pytest.skip("outside the reduced grid run under TRITON_INTERPRET=1")
    inputs = make_batch(gen, [9, 33, 20, 50], Lq=2, Hq=4, D=D, dtype=dtype, Lnew=2)
    # Spread the 4 sequences over a cache of 6 rows, in a shuffled order.
    rows = torch.tensor([4, 0, 5, 2], dtype=torch.int32)
    for name in ("k_cache", "v_cache"):
        big = torch.full((6,) + inputs[name].shape[1:], math.nan, dtype=dtype)
        big[rows.long()] = inputs[name]
        inputs[name] = big
    inputs["cache_batch_idx"] = rows
    check_decode(inputs, backend, num_splits=2)


def test_many_rows_per_kv_head(gen, backend):
    """Lq x group = 5 x 8 = 40 query rows per kv head: more than one CTA's worth of the CUDA kernel
    (DECODE_ROWS_PER_CTA = 32)."""
    if interpreted(backend):
        pytest.skip("outside the reduced grid run under TRITON_INTERPRET=1")
    inputs = make_batch(gen, [1, 100, 700], Lq=5, Hq=16, D=128, dtype=torch.float16, page=32, Lnew=5)
    check_decode(inputs, backend, num_splits=2)


def test_strided_inputs(gen, backend):
    """q from a (B, Hq, Lq, D) tensor, k/v caches as views of one interleaved buffer, strided k_new."""
    B, L, Hkv, Hq, D = 3, 50, 2, 8, 32
    kv = randn(B, L, 2, Hkv, D, gen=gen)  # (B, L, {k, v}, Hkv, D)
    q = randn(B, Hq, 4, D, gen=gen).transpose(1, 2)  # (B, 4, Hq, D), not contiguous
    new = randn(B, Hkv, 3, 2 * D, gen=gen)[..., ::2].transpose(1, 2)  # (B, 3, Hkv, D), strided head dim
    inputs = dict(
        q=q,
        k_cache=kv[:, :, 0],
        v_cache=kv[:, :, 1],
        cache_seqlens=torch.tensor([0, 20, 47], dtype=torch.int32),
        k_new=new,
        v_new=new * 2,
        block_table=None,
    )
    check_decode(inputs, backend, num_splits=2)
    # same numbers as from contiguous copies
    contiguous = {n: (t.contiguous() if t is not None else None) for n, t in inputs.items()}
    out, _ = run_decode(inputs, backend, num_splits=2)
    out_c, _ = run_decode(contiguous, backend, num_splits=2)
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("page", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_then_attend_equals_attending_the_concatenation(gen, page, dtype, backend):
    inputs = make_batch(gen, [4, 100, 517], Lq=3, Hq=8, D=64, dtype=dtype, page=page, Lnew=3)
    out, (k_after, v_after) = run_decode(inputs, backend, num_splits=2)
    # The same keys, already in the cache: no append, lengths advanced by Lnew.
    y = clone_inputs(inputs)
    y["k_cache"], y["v_cache"] = k_after.clone(), v_after.clone()
    y["cache_seqlens"] = y["cache_seqlens"] + 3
    y["k_new"] = y["v_new"] = None
    out_concat, (k_untouched, _) = run_decode(y, backend, num_splits=2)
    torch.testing.assert_close(out, out_concat, atol=0, rtol=0)
    assert max_abs_err(k_untouched, k_after) == 0  # attending did not touch the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_counts_agree(gen, dtype, backend):
    small = interpreted(backend)  # ~20 ms per program there: fewer keys, fewer splits
    lengths = [1, 300, 700] if small else [1, 700, 2000]
    inputs = make_batch(gen, lengths, Lq=2, Hq=8, D=64, dtype=dtype, page=16)
    outs = [
        run_decode(inputs, backend, num_splits=s, return_lse=True)[0]
        for s in ((1, 2, 7, 16, 0) if small else (1, 2, 3, 7, 64, 0))
    ]
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], **tol)
        torch.testing.assert_close(lse, outs[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_of_partial_states_equals_attention_over_the_union(gen, dtype, backend):
    """Attend to keys [0, a) and [a, L) separately (non-causal), merge, compare with attending to [0, L)."""
    B, L, Hkv, Hq, D = 3, 300, 2, 8, 64
    skip_unsupported("decode", backend, dtype=dtype, head_dim=D)
    skip_unsupported("merge", backend, dtype=dtype, head_dim=D)
    inputs = make_batch(gen, [L] * B, Lq=4, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype)
    a = torch.tensor([0, 100, 299], dtype=torch.int32)  # split points (empty prefix included)
    k, v, q = inputs["k_cache"], inputs["v_cache"], inputs["q"]
    dev = device_for(backend)
    kw = dict(causal=False, return_lse=True, backend=backend)
    full, full_lse = fusedattn.decode_attention(q.to(dev), k.to(dev), v.to(dev), cache_seqlens=L, **kw)
    out_a, lse_a = fusedattn.decode_attention(q.to(dev), k.to(dev), v.to(dev), cache_seqlens=a.to(dev), **kw)
    # suffix of sequence b: keys a[b] .. L-1, shifted to the start of a cache row
    k_b = torch.stack([torch.roll(k[b], -int(a[b]), dims=0) for b in range(B)])
    v_b = torch.stack([torch.roll(v[b], -int(a[b]), dims=0) for b in range(B)])
    out_b, lse_b = fusedattn.decode_attention(q.to(dev), k_b.to(dev), v_b.to(dev), cache_seqlens=(L - a).to(dev), **kw)
    out, lse = fusedattn.merge_attention_states(out_a, lse_a, out_b, lse_b, backend=backend)
    out, lse, full, full_lse = out.cpu(), lse.cpu(), full.cpu(), full_lse.cpu()
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref, ref_lse = attention_ref(
        q.double().transpose(1, 2),
        k[:, :L].double().transpose(1, 2),
        v[:, :L].double().transpose(1, 2),
        return_lse=True,
        compute_dtype=torch.float64,
    )
    ref = ref.transpose(1, 2)
    # The merge adds one rounding of the output on top of the two partial results.
    tol = 2e-6 if dtype == torch.float32 else 2 * max_abs_err(full, ref) + 1e-2
    assert max_abs_err(out, ref) <= tol
    assert max_abs_err(lse, ref_lse) <= 1e-5 * max(1.0, ref_lse.abs().max().item())
    assert max_abs_err(lse, full_lse) <= 1e-5 * max(1.0, ref_lse.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_merge_vs_reference(gen, dtype, backend):
    B, L, H, D = 2, 7, 3, 40
    skip_unsupported("merge", backend, dtype=dtype, head_dim=D)
    op = raw_op("merge_attention_states", backend)
    out_a, out_b = randn(B, L, H, D, dtype=dtype, gen=gen), randn(B, L, H, D, dtype=dtype, gen=gen)
    lse_a, lse_b = randn(B, H, L, gen=gen) * 4, randn(B, H, L, gen=gen) * 4
    lse_a[0, 0, :3] = -math.inf  # one side empty
    lse_b[0, 1, 2:5] = -math.inf
    lse_a[1, 2, 4:] = lse_b[1, 2, 4:] = -math.inf  # both empty
    out_a[0, :3, 0] = math.nan  # the output behind an empty state is never read
    dev = device_for(backend)
    out, lse = (r.cpu() for r in op(out_a.to(dev), lse_a.to(dev), out_b.to(dev), lse_b.to(dev)))
    ref, ref_lse = merge_attention_states_ref(out_a.double(), lse_a, out_b.double(), lse_b, compute_dtype=torch.float64)
    base, base_lse = merge_attention_states_ref(out_a, lse_a, out_b, lse_b, compute_dtype=dtype)
    assert_close_2x(out, ref, base)
    assert_close_2x(lse, ref_lse, base_lse.float(), name="lse")
    empty = lse_a.isinf() & lse_b.isinf()  # (B, H, L)
    assert (out.transpose(1, 2)[empty] == 0).all() and (lse[empty] == -math.inf).all()
    one_sided = lse_a.isinf() & ~lse_b.isinf()
    torch.testing.assert_close(out.transpose(1, 2)[one_sided], out_b.transpose(1, 2)[one_sided], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_merge_attention_states_head_dim_64(gen, dtype, backend):
    """The raw merge op at head dim 64 against the float64 reference (baseline: float32 math); a state empty on
    one side, on both sides (out 0, lse -inf), and a NaN output behind a zero weight that is never read."""
    Bm, L, H, D = 2, 5, 3, 64
    skip_unsupported("merge", backend, dtype=dtype, head_dim=D)
    op, dev = raw_op("merge_attention_states", backend), device_for(backend)
    oa, ob = (randn(Bm, L, H, D, dtype=dtype, gen=gen).to(dev) for _ in range(2))
    la, lb = (randn(Bm, H, L, gen=gen).to(dev) for _ in range(2))
    la[0, 0, 0] = -math.inf  # one side empty
    la[1, 1, 1] = lb[1, 1, 1] = -math.inf  # both empty
    oa[1, 1, 1] = math.nan  # never read: its weight is 0
    out, lse = op(oa, la, ob, lb)
    ref, ref_lse = merge_attention_states_ref(
        oa.double(), la.double(), ob.double(), lb.double(), compute_dtype=torch.float64
    )
    base, base_lse = merge_attention_states_ref(oa, la, ob, lb, compute_dtype=torch.float32)
    assert_close_2x(out, ref, base)
    assert_close_2x(lse, ref_lse, base_lse)
    assert (out[1, 1, 1] == 0).all() and lse[1, 1, 1] == -math.inf


@pytest.mark.parametrize("page", [None, 4])
@pytest.mark.parametrize("dtype,D", [(torch.float32, 32), (torch.bfloat16, 64)])
def test_zero_length_sequence_gives_zero(gen, page, backend, dtype, D):
    if interpreted(backend) and dtype != torch.float32:
        pytest.skip("outside the reduced grid run under TRITON_INTERPRET=1")
    inputs = make_batch(gen, [0, 5, 0], Lq=3, Hq=4, D=D, dtype=dtype, page=page)
    if page is not None:
        inputs["block_table"][0] = 10**6  # an empty sequence uses no page: its row is never read
    (out, lse), _ = run_decode(inputs, backend, return_lse=True)
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert (lse[0] == -math.inf).all() and (lse[2] == -math.inf).all()
    # causal, bottom-right: with 5 keys and 3 queries every query of sequence 1 sees some key
    assert lse[1].isfinite().all()
    check_decode(inputs, backend)


def test_empty_sequence_with_splits_gives_zero(gen, backend):
    """An empty sequence beside a short one, paged, split in two: out 0 and lse -inf for the empty one."""
    if interpreted(backend):
        pytest.skip("outside the reduced grid run under TRITON_INTERPRET=1")
    inputs = make_batch(gen, [0, 5], Lq=1, Hq=4, D=64, dtype=torch.bfloat16, page=16)
    out, lse = check_decode(inputs, backend, num_splits=2)
    assert (out[0] == 0).all() and (lse[0] == -math.inf).all()


@pytest.mark.parametrize("B,Lq", [(0, 1), (2, 0)])
def test_empty_batch_or_queries(gen, B, Lq, backend):
    inputs = make_batch(gen, [3] * B, Lq=Lq, Hq=4, D=16, Lnew=1)
    (out, lse), (k_out, _) = run_decode(inputs, backend, return_lse=True)
    assert out.shape == (B, Lq, 4, 16) and lse.shape == (B, 4, Lq)
    if B:  # the append still happens
        _, _, (k_after, _) = reference_pair(inputs)
        assert max_abs_err(k_out, k_after) == 0


def test_reference_backend_and_fallback(gen):
    inputs = make_batch(gen, [5, 9], Lq=2, Hq=4, D=16, page=4, Lnew=1)
    out_cpu = _call(fusedattn.decode_attention, clone_inputs(inputs), dict(backend="cpu"))
    out_ref = _call(fusedattn.decode_attention, clone_inputs(inputs), dict(backend="reference"))
    torch.testing.assert_close(out_cpu, out_ref, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="falling back to the reference"):
        out64 = _call(fusedattn.decode_attention, clone_inputs(inputs, torch.float64), {})
    torch.testing.assert_close(out64.float(), out_ref, atol=1e-5, rtol=1e-5)


def test_triton_backend_selection(gen):
    """backend="triton" runs the Triton op where it can run, and otherwise refuses naming the reason."""
    inputs = make_batch(gen, [5, 9], Lq=2, Hq=4, D=16, page=4, Lnew=1)
    if TRITON_REASON is not None:
        with pytest.raises(RuntimeError, match="triton"):
            run_decode(inputs, "triton")
        return
    out, _ = run_decode(inputs, "triton")
    out_ref, _ = run_decode(inputs, "reference")
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    if TRITON_DEVICE == "cuda":  # "auto" on CUDA tensors picks the Triton kernel: same numbers, no warning
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out_auto, _ = run_decode(inputs, "auto", device="cuda")
        torch.testing.assert_close(out_auto, out, atol=0, rtol=0)


@skip_triton
def test_triton_split_heuristic():
    from fusedattn.kernels.decode import MIN_KEYS_PER_SPLIT, num_splits_heuristic

    # small batch, long cache: enough programs for 2 waves of 132 SMs (H100)
    assert num_splits_heuristic(1 * 8, 32768, 132) == 33
    assert num_splits_heuristic(64 * 8, 8192, 132) == 1  # the batch alone fills the machine
    assert num_splits_heuristic(8, 300, 132) == 1  # too short to split
    assert num_splits_heuristic(8, 4 * MIN_KEYS_PER_SPLIT, 132) == 4  # capped by keys per split
    assert num_splits_heuristic(1, 10**7, 10**4) == 1024  # capped by MAX_SPLITS


# ---------------------------------------------------------------------------------------------- opcheck, compile


def _op_args(gen, page, with_new, lengths=(3, 11)):
    inputs = make_batch(gen, list(lengths), Lq=2, Hq=4, D=16, page=page, Lnew=2 if with_new else 0)
    inputs = {n: (torch.nan_to_num(t) if t is not None and t.is_floating_point() else t) for n, t in inputs.items()}
    return (
        inputs["q"],
        inputs["k_cache"],
        inputs["v_cache"],
        inputs["cache_seqlens"],
        inputs["k_new"],
        inputs["v_new"],
        inputs["block_table"],
        None,
        0.25,
        -1,
        0,
        0.0,
        2,
    )


def _ops_of(backend):
    """(decode op, merge op, device) of a backend."""
    return raw_op("decode_fwd", backend), raw_op("merge_attention_states", backend), device_for(backend)


@pytest.mark.parametrize("page", [None, 4])
@pytest.mark.parametrize("with_new", [False, True])
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_decode_fwd(gen, page, with_new, backend):
    skip_unsupported("decode", backend, dtype=torch.float32, head_dim=16)
    op, _, dev = _ops_of(backend)
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in _op_args(gen, page, with_new))
    torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_merge(gen, dtype, backend):
    skip_unsupported("merge", backend, dtype=dtype, head_dim=8)
    _, op, dev = _ops_of(backend)
    args = (
        randn(2, 5, 3, 8, dtype=dtype, gen=gen),
        randn(2, 3, 5, gen=gen),
        randn(2, 5, 3, 8, dtype=dtype, gen=gen),
        randn(2, 3, 5, gen=gen),
    )
    torch.library.opcheck(op.default, tuple(a.to(dev) for a in args))


@skip_triton
@pytest.mark.parametrize("page", [None, 4])
def test_triton_op_body_runs_on_fake_tensors(gen, page):
    """On a GPU the Triton ops are triton_ops: torch.compile runs their Python body on fake tensors (it is also
    their fake impl). It must never read tensor data: run it under FakeTensorMode with launches recorded."""
    from fusedattn.kernels import decode as kd
    from torch._subclasses.fake_tensor import FakeTensorMode

    launched = []

    def record(kernel):
        return _Grid(kernel, launched)

    args = _op_args(gen, page, True, lengths=(3, 300))  # more keys than one block: the 2 splits both run
    merge_args = (
        randn(2, 5, 3, 8, gen=gen),
        randn(2, 3, 5, gen=gen),
        randn(2, 5, 3, 8, gen=gen),
        randn(2, 3, 5, gen=gen),
    )
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out, lse = kd._decode_impl(*fake, record)
        assert out.shape == (2, 2, 4, 16) and lse.shape == (2, 4, 2) and lse.dtype == torch.float32
        merged, merged_lse = kd._merge_impl(*(mode.from_tensor(a) for a in merge_args), record)
        assert merged.shape == merge_args[0].shape and merged_lse.shape == merge_args[1].shape
    assert [k for k, _ in launched] == [kd._append_kv, kd._decode_split_kv, kd._combine_lse, kd._combine_lse]


class _Grid:
    """kernel[grid](...) that records the launch instead of running it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, grid))


class _Step(torch.nn.Module):
    """One decoding step: append the new token's k/v in place and attend, then merge with a second state."""

    def __init__(self, backend="auto"):
        super().__init__()
        self.backend = backend

    def forward(self, q, k_cache, v_cache, lens, k_new, v_new, block_table):
        out, lse = fusedattn.decode_attention(
            q,
            k_cache,
            v_cache,
            cache_seqlens=lens,
            k_new=k_new,
            v_new=v_new,
            block_table=block_table,
            return_lse=True,
            backend=self.backend,
        )
        merged, _ = fusedattn.merge_attention_states(out, lse, out * 2, lse - 1, backend=self.backend)
        return out, lse, merged


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("page", [None, 4])
@pytest.mark.parametrize("kernels", FUSED)
def test_torch_compile_fullgraph(gen, backend, page, kernels):
    skip_unsupported("decode", kernels, dtype=torch.float32, head_dim=16)
    torch._dynamo.reset()
    inputs = make_batch(gen, [3, 11], Lq=1, Hq=4, D=16, page=page, Lnew=1)
    inputs = {n: (torch.nan_to_num(t) if t is not None and t.is_floating_point() else t) for n, t in inputs.items()}
    inputs = on(inputs, device_for(kernels))
    names = ("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "block_table")
    eager_in, compiled_in = clone_inputs(inputs), clone_inputs(inputs)
    model = _Step(kernels)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        expected = model(*(eager_in[n] for n in names))
        got = compiled(*(compiled_in[n] for n in names))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    # the in-place append happened in the compiled graph too
    torch.testing.assert_close(compiled_in["k_cache"], eager_in["k_cache"], atol=0, rtol=0)
    torch.testing.assert_close(compiled_in["v_cache"], eager_in["v_cache"], atol=0, rtol=0)


@pytest.mark.parametrize("kernels", FUSED)
def test_compiled_call_still_checks_indices(gen, kernels):
    """Under torch.compile the wrapper skips its value checks; the op's own checks still refuse bad indices.
    (The GPU Triton op is traced by torch.compile, so its host-side checks cannot read the indices there; its
    kernels then refuse the bad page instead: no access, and the sequence's output is NaN.)"""
    skip_unsupported("decode", kernels, dtype=torch.float32, head_dim=16)
    torch._dynamo.reset()
    inputs = make_batch(gen, [3, 11], Lq=1, Hq=4, D=16, page=4)
    inputs["block_table"][1, 0] = 999
    inputs = on(inputs, device_for(kernels))
    model = torch.compile(_Step(kernels), fullgraph=True, backend="aot_eager")
    args = (
        inputs["q"],
        inputs["k_cache"],
        inputs["v_cache"],
        inputs["cache_seqlens"],
        None,
        None,
        inputs["block_table"],
    )
    if kernels == "triton" and device_for(kernels) == "cuda":
        out, _, _ = model(*args)
        assert out[1].isnan().all() and not out[0].isnan().any()
        return
    with pytest.raises(Exception, match="block_table"):
        model(*args)


# ---------------------------------------------------------------------------------------------- bad inputs


def _valid(gen, paged=True):
    """A valid call (paged, or contiguous) with finite cache contents, as a dict of decode_attention's inputs."""
    inputs = make_batch(gen, [3, 11], Lq=1, Hq=4, D=16, page=4 if paged else None, Lnew=1)
    return {n: (torch.nan_to_num(t) if t is not None and t.is_floating_point() else t) for n, t in inputs.items()}


def _table(x, idx, value):
    table = x["block_table"].clone()
    table[idx] = value
    return {**x, "block_table": table}


def _contiguous(x, L_max=20, **changes):
    """x with a contiguous (2, L_max, 2, 16) cache instead of the paged one."""
    return {
        **x,
        "block_table": None,
        "k_cache": torch.zeros(2, L_max, 2, 16),
        "v_cache": torch.zeros(2, L_max, 2, 16),
        **changes,
    }


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


# name: (mutation of the valid paged inputs, argument the error names, whether the raw op checks it too: the
# device checks need real tensors, which only the Python wrapper can refuse before the dispatcher does)
BAD_INPUTS = {
    "negative_seqlen": (lambda x: {**x, "cache_seqlens": _i32(3, -1)}, "cache_seqlens", True),
    "seqlen_past_capacity": (lambda x: {**x, "cache_seqlens": _i32(3, 16)}, "cache_seqlens", True),  # 16+1 > 4x4
    "seqlen_past_capacity_contiguous": (lambda x: _contiguous(x, L_max=10), "cache_seqlens", True),  # 10+1 > 10
    "seqlens_int64": (lambda x: {**x, "cache_seqlens": x["cache_seqlens"].long()}, "cache_seqlens", True),
    "seqlens_shape": (lambda x: {**x, "cache_seqlens": _i32(3)}, "cache_seqlens", True),
    "block_table_entry_too_large": (lambda x: _table(x, (1, 2), 10**4), "block_table", True),
    "block_table_entry_negative": (lambda x: _table(x, (0, 0), -1), "block_table", True),
    "block_table_int64": (lambda x: {**x, "block_table": x["block_table"].long()}, "block_table", True),
    "block_table_rows": (lambda x: {**x, "block_table": x["block_table"][:1]}, "block_table", True),
    "cache_batch_idx_with_block_table": (lambda x: {**x, "cache_batch_idx": _i32(0, 1)}, "cache_batch_idx", True),
    "cache_batch_idx_out_of_range": (lambda x: _contiguous(x, cache_batch_idx=_i32(0, 2)), "cache_batch_idx", True),
    "cache_batch_idx_int64": (lambda x: _contiguous(x, cache_batch_idx=torch.tensor([0, 1])), "cache_batch_idx", True),
    "heads_not_a_multiple": (lambda x: {**x, "q": torch.zeros(2, 1, 3, 16)}, "k_cache", True),
    "v_cache_heads": (lambda x: {**x, "v_cache": x["v_cache"][:, :, :1]}, "v_cache", True),
    "k_cache_head_dim": (lambda x: {**x, "k_cache": x["k_cache"][..., :8]}, "k_cache", True),
    "k_new_heads": (lambda x: {**x, "k_new": x["k_new"][:, :, :1]}, "k_new", True),
    "v_new_missing": (lambda x: {**x, "v_new": None}, "v_new", True),
    "k_cache_dtype": (lambda x: {**x, "k_cache": x["k_cache"].to(torch.bfloat16)}, "k_cache", True),
    "k_new_dtype": (lambda x: {**x, "k_new": x["k_new"].double()}, "k_new", True),
    "k_cache_strided_head_dim": (lambda x: {**x, "k_cache": torch.zeros(7, 4, 2, 32)[..., ::2]}, "k_cache", True),
    "q_3d": (lambda x: {**x, "q": x["q"][0]}, "q", True),
    "k_cache_device": (lambda x: {**x, "k_cache": x["k_cache"].to("meta")}, "k_cache", False),
    "seqlens_device": (lambda x: {**x, "cache_seqlens": x["cache_seqlens"].to("meta")}, "cache_seqlens", False),
    "block_table_device": (lambda x: {**x, "block_table": x["block_table"].to("meta")}, "block_table", False),
}


# cases where only index *values* are wrong (shapes and dtypes fine)
VALUE_CASES = {
    "negative_seqlen",
    "seqlen_past_capacity",
    "seqlen_past_capacity_contiguous",
    "block_table_entry_too_large",
    "block_table_entry_negative",
    "cache_batch_idx_out_of_range",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_bad_inputs_raise_naming_the_argument(gen, case, backend):
    skip_unsupported("decode", backend, dtype=torch.float32, head_dim=16)
    mutate, name, raw_op_checks = BAD_INPUTS[case]
    x = mutate(_valid(gen))
    dev = device_for(backend)
    if dev != "cpu":
        x = {n: (t.to(dev) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t) for n, t in x.items()}
    with pytest.raises(ValueError, match=name):
        _call(fusedattn.decode_attention, dict(x), dict(backend=backend))
    if not raw_op_checks:
        return
    # The op itself (what torch.compile'd code calls) refuses it too, before any access. On a GPU the Triton op
    # leaves index values to its kernels (no device sync per call): they touch nothing outside the tensors and
    # give the affected sequence NaN output.
    op = _ops_of(backend)[0]
    args = (
        x["q"],
        x["k_cache"],
        x["v_cache"],
        x["cache_seqlens"],
        x["k_new"],
        x["v_new"],
        x["block_table"],
        x.get("cache_batch_idx"),
        0.25,
        -1,
        0,
        0.0,
        0,
    )
    if dev == "cuda" and case in VALUE_CASES:
        out, lse = op(*args)
        assert out.isnan().any() and lse.isnan().any()
        return
    with pytest.raises(RuntimeError, match=name):
        op(*args)


@skip_triton
@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_triton_kernels_refuse_bad_indices_themselves(gen, case, monkeypatch):
    """The path where no host check reads the indices (a GPU, or torch.compile tracing): the kernels touch
    nothing outside the caches, skip the bad sequence's append, and give it NaN output and lse; the other
    sequence is unaffected."""
    from fusedattn.kernels import decode as kd

    monkeypatch.setattr(kd, "_is_concrete", lambda *ts: False)
    x = on(BAD_INPUTS[case][0](_valid(gen)), TRITON_DEVICE)
    seqlens, table, cbi = x["cache_seqlens"], x["block_table"], x.get("cache_batch_idx")
    bad = {
        "negative_seqlen": 1,
        "seqlen_past_capacity": 1,
        "seqlen_past_capacity_contiguous": 1,
        "block_table_entry_too_large": 1,
        "block_table_entry_negative": 0,
        "cache_batch_idx_out_of_range": 1,
    }[case]
    k_before = x["k_cache"].clone()
    out, lse = kd._decode_impl(
        x["q"],
        x["k_cache"],
        x["v_cache"],
        seqlens,
        x["k_new"],
        x["v_new"],
        table,
        cbi,
        0.25,
        -1,
        0,
        0.0,
        2,
        kd._launch if INTERPRET else kd.wrap_triton,
    )
    out, lse = out.cpu(), lse.cpu()
    assert out[bad].isnan().all() and lse[bad].isnan().all()
    assert out[1 - bad].isfinite().all() and lse[1 - bad].isfinite().all()
    if case.startswith("seqlen") or case == "negative_seqlen" or case == "cache_batch_idx_out_of_range":
        # the bad sequence's append was skipped: only the good sequence's rows changed
        changed = (x["k_cache"] != k_before).flatten(2).any(-1).nonzero()  # (changed (row, position) pairs)
        good_row = int(cbi[1 - bad]) if cbi is not None else 1 - bad
        if table is None:
            assert set(changed[:, 0].tolist()) <= {good_row}


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(num_splits=-1), "num_splits"),
        (dict(window=(-2, 0)), "window"),
        (dict(softcap=-1.0), "softcap"),
        (dict(scale=math.inf), "scale"),
    ],
)
def test_bad_scalars(gen, kw, name):
    with pytest.raises(ValueError, match=name):
        _call(fusedattn.decode_attention, _valid(gen), kw)


def test_refuses_inputs_that_require_grad(gen):
    x = _valid(gen)
    x["q"].requires_grad_()
    with pytest.raises(ValueError, match="inference-only"):
        _call(fusedattn.decode_attention, x, {})
    with torch.no_grad():
        _call(fusedattn.decode_attention, x, {})


@pytest.mark.parametrize(
    "bad,name",
    [
        (lambda a: a.__setitem__("lse_a", a["lse_a"].double()), "lse_a"),
        (lambda a: a.__setitem__("lse_b", a["lse_b"][:, :, :2]), "lse_b"),
        (lambda a: a.__setitem__("out_b", a["out_b"].to(torch.bfloat16)), "out_b"),
        (lambda a: a.__setitem__("out_a", a["out_a"][0]), "out_a"),
    ],
)
@pytest.mark.parametrize("backend", FUSED)
def test_merge_bad_inputs(gen, bad, name, backend):
    skip_unsupported("merge", backend, dtype=torch.float32, head_dim=8)
    args = dict(
        out_a=randn(2, 5, 3, 8, gen=gen),
        lse_a=randn(2, 3, 5, gen=gen),
        out_b=randn(2, 5, 3, 8, gen=gen),
        lse_b=randn(2, 3, 5, gen=gen),
    )
    bad(args)
    args = {n: t.to(device_for(backend)) for n, t in args.items()}
    with pytest.raises(ValueError, match=name):
        fusedattn.merge_attention_states(**args, backend=backend)
    with pytest.raises(RuntimeError, match=name):
        _ops_of(backend)[1](args["out_a"], args["lse_a"], args["out_b"], args["lse_b"])


# ---------------------------------------------------------------------------------------------- KV caches


def _history_ref(q, ks, vs):
    """Reference attention of q (B, Lq, Hq, D) over the per-sequence histories ks[b], vs[b] (L_b, Hkv, D)."""
    outs = []
    for b in range(q.shape[0]):
        k, v = ks[b].permute(1, 0, 2)[None], vs[b].permute(1, 0, 2)[None]  # (1, Hkv, L, D)
        outs.append(attention_ref(q[b : b + 1].transpose(1, 2), k, v, causal=True)[0].transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("paged", [False, True])
def test_kv_cache_generation(gen, paged):
    """Prefill by append, then decode token by token with attend; every step matches attention over the history."""
    B, Hkv, Hq, D = 3, 2, 8, 16
    if paged:
        cache = PagedKVCache(num_pages=40, page_size=4, max_batch=B, max_seq_len=64, num_kv_heads=Hkv, head_dim=D)
    else:
        cache = KVCache(max_batch=B, max_seq_len=64, num_kv_heads=Hkv, head_dim=D)
    ks = [torch.empty(0, Hkv, D) for _ in range(B)]
    vs = [torch.empty(0, Hkv, D) for _ in range(B)]
    k0, v0 = randn(B, 5, Hkv, D, gen=gen), randn(B, 5, Hkv, D, gen=gen)
    cache.append(k0, v0)
    ks = [torch.cat([ks[b], k0[b]]) for b in range(B)]
    vs = [torch.cat([vs[b], v0[b]]) for b in range(B)]
    for step in range(6):
        Lq = 2 if step == 0 else 1  # a chunk, then single tokens
        q, k, v = (randn(B, Lq, Hq, D, gen=gen), randn(B, Lq, Hkv, D, gen=gen), randn(B, Lq, Hkv, D, gen=gen))
        out = cache.attend(q, k, v)
        ks = [torch.cat([ks[b], k[b]]) for b in range(B)]
        vs = [torch.cat([vs[b], v[b]]) for b in range(B)]
        torch.testing.assert_close(out, _history_ref(q, ks, vs), atol=1e-5, rtol=1e-5)
    assert cache.seqlens.tolist() == [12] * B
    if paged:
        assert cache.num_free_pages == 40 - B * 3  # 12 tokens = 3 pages of 4 per sequence


@pytest.mark.parametrize("paged", [False, True])
def test_kv_cache_prefill_into_empty_sequences(gen, paged):
    """attend() of a prompt into empty sequences takes the dense kernel; it must store the prompt and give what
    decode_attention over the same (empty) cache gives, lse included; a sequence already holding tokens makes
    the call take decode_attention again."""
    B, Hkv, Hq, D, T = 2, 2, 4, 16, 9

    def make():
        if paged:
            return PagedKVCache(num_pages=20, page_size=4, max_batch=3, max_seq_len=32, num_kv_heads=Hkv, head_dim=D)
        return KVCache(max_batch=3, max_seq_len=32, num_kv_heads=Hkv, head_dim=D)

    q, k, v = randn(B, T, Hq, D, gen=gen), randn(B, T, Hkv, D, gen=gen), randn(B, T, Hkv, D, gen=gen)
    cache = make()
    out, lse = cache.attend(q, k, v, seq_ids=[2, 0], return_lse=True)
    assert cache.seqlens.tolist() == [T, 0, T]
    want = _history_ref(q, [k[0], k[1]], [v[0], v[1]])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    fresh = make()
    fresh._reserve(fresh._ids([2, 0], B), torch.full((B,), T))  # pages for the append (a no-op when contiguous)
    want_out, want_lse = fusedattn.decode_attention(
        q,
        fresh.k,
        fresh.v,
        k_new=k,
        v_new=v,
        return_lse=True,
        **{"cache_seqlens": torch.zeros(B, dtype=torch.int32), **fresh._decode_kwargs(fresh._ids([2, 0], B))},
    )
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    q2 = randn(B, 1, Hq, D, gen=gen)
    torch.testing.assert_close(
        cache.attend(q2, seq_ids=[2, 0]), _history_ref(q2, [k[0], k[1]], [v[0], v[1]]), atol=1e-5, rtol=1e-5
    )
    # one empty and one filled sequence: decode_attention over the filled one's history
    k3, v3, q3 = randn(B, 3, Hkv, D, gen=gen), randn(B, 3, Hkv, D, gen=gen), randn(B, 3, Hq, D, gen=gen)
    out3 = cache.attend(q3, k3, v3, seq_ids=[1, 2])
    assert cache.seqlens.tolist() == [T, 3, T + 3]
    want3 = _history_ref(q3, [k3[0], torch.cat([k[0], k3[1]])], [v3[0], torch.cat([v[0], v3[1]])])
    torch.testing.assert_close(out3, want3, atol=1e-5, rtol=1e-5)


def test_kv_cache_seq_ids_update_and_reset(gen):
    cache = KVCache(max_batch=4, max_seq_len=32, num_kv_heads=1, head_dim=8)
    k, v = randn(2, 6, 1, 8, gen=gen), randn(2, 6, 1, 8, gen=gen)
    cache.update(0, k, v, seq_ids=[3, 1])
    assert cache.seqlens.tolist() == [0, 6, 0, 6]
    torch.testing.assert_close(cache.k[3, :6], k[0])
    q = randn(2, 1, 2, 8, gen=gen)
    out = cache.attend(q, seq_ids=torch.tensor([1, 3]))
    torch.testing.assert_close(out, _history_ref(q, [k[1], k[0]], [v[1], v[0]]), atol=1e-5, rtol=1e-5)
    cache.reset([1])
    assert cache.seqlens.tolist() == [0, 0, 0, 6]
    with pytest.raises(RuntimeError, match="full"):
        cache.update(30, k, v, seq_ids=[0, 2])


def test_paged_kv_cache_allocates_and_frees_pages(gen):
    cache = PagedKVCache(num_pages=6, page_size=4, max_batch=3, max_seq_len=16, num_kv_heads=1, head_dim=8)
    k = randn(2, 5, 1, 8, gen=gen)
    cache.append(k, k, seq_ids=[0, 2])  # 5 tokens: 2 pages each
    assert cache.num_free_pages == 2 and [len(p) for p in cache.pages] == [2, 0, 2]
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.append(randn(1, 9, 1, 8, gen=gen), randn(1, 9, 1, 8, gen=gen), seq_ids=[1])  # needs 3
    cache.free([0])
    assert cache.num_free_pages == 4 and cache.seqlens.tolist() == [0, 0, 5]
    k1 = randn(1, 9, 1, 8, gen=gen)
    cache.append(k1, k1, seq_ids=[1])  # reuses the freed pages
    assert cache.num_free_pages == 1
    q = randn(2, 1, 2, 8, gen=gen)
    out = cache.attend(q, seq_ids=[1, 2])
    torch.testing.assert_close(out, _history_ref(q, [k1[0], k[1]], [k1[0], k[1]]), atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.num_free_pages == 6 and cache.seqlens.tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------- benchmark family


def test_bench_decode_family_end_to_end(tmp_path, monkeypatch):
    """`python -m fusedattn bench decode` on tiny cases: tables with GB/s, % of copy bandwidth and the peer ratio."""
    import json

    from fusedattn import bench
    from fusedattn.bench import decode as fam

    tiny = [dict(B=2, Hq=4, Hkv=2, D=32, L=100, dtype="fp32", layout=layout) for layout in ("contiguous", "paged16")]
    monkeypatch.setattr(fam, "cases", lambda **kw: tiny)
    monkeypatch.setattr(fam, "COPY_MIB", 4)  # the copy timed beside each case (256 MiB in real runs)
    monkeypatch.setattr(fam, "_copy_buf", None)
    bench.main(["decode", "--repeats", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_decode.json").read_text())
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"fusedattn", "torch_sdpa"} and len(ok) == 4  # the copy is no backend
    assert all(r["median_ms"] > 0 and r["max_err"] < 1e-4 for r in ok)
    assert all(fam.copy_gbps(c) > 0 for c in tiny)  # a copy timed beside each case
    assert all(float(r["copy GB/s"]) > 0 and r["% of copy"].endswith("%") for r in ok)  # in the JSON too
    md = (tmp_path / "cpu_decode.md").read_text()
    assert "copy GB/s" in md and "% of copy" in md and "ratio vs torch_sdpa" in md


# ---------------------------------------------------------------------------------------------- cache memory


def test_zeros_kv_cache_huge_page_backed_and_usable():
    """zeros_kv_cache: zero-filled, contiguous, the requested shape/dtype; a large CPU cache starts on a 2 MiB
    boundary (huge pages, where the OS grants them) and outlives every Python reference but the tensor's."""
    import gc

    from fusedattn.memory import HUGE_PAGE, huge_pages_supported, zeros_kv_cache

    shape = (2, 1024, 4, 128)  # 2 MiB of bf16
    k = fusedattn.zeros_kv_cache(shape, dtype=torch.bfloat16)
    v = fusedattn.zeros_kv_cache(shape, dtype=torch.bfloat16)
    assert k.shape == shape and k.dtype == torch.bfloat16 and k.is_contiguous() and not k.any()
    if huge_pages_supported():
        assert k.data_ptr() % HUGE_PAGE == 0
    gc.collect()
    g = torch.Generator().manual_seed(0)
    k.normal_(generator=g)
    v.normal_(generator=g)
    q = torch.randn(2, 1, 8, 128, dtype=torch.bfloat16, generator=g)
    lens = torch.tensor([1000, 17], dtype=torch.int32)
    out = fusedattn.decode_attention(q, k, v, cache_seqlens=lens, backend="cpu")
    ref = fusedattn.decode_attention(q, k.clone(), v.clone(), cache_seqlens=lens, backend="reference")
    assert (out.float() - ref.float()).abs().max() < 2e-2
    small = zeros_kv_cache((3, 5), dtype=torch.float32)  # below 2 MiB: plain torch.zeros
    assert small.shape == (3, 5) and not small.any()
    assert zeros_kv_cache((4, 1024, 8, 64), dtype=torch.float16, huge_pages=False).is_contiguous()


def test_kv_cache_buffers_come_from_zeros_kv_cache():
    from fusedattn.memory import HUGE_PAGE, huge_pages_supported

    cache = KVCache(max_batch=2, max_seq_len=2048, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16)
    assert cache.k.shape == (2, 2048, 2, 128) and not cache.k.any() and not cache.v.any()
    if huge_pages_supported():
        assert cache.k.data_ptr() % HUGE_PAGE == 0 and cache.v.data_ptr() % HUGE_PAGE == 0
