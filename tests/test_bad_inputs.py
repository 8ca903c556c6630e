"""Hostile inputs: each gives a clear error or a correct result, and none crashes the process.

The catalogue:
  * sizes: element offsets beyond int32 (exercised for real on a sparse 4 GiB storage), expanded (stride-0)
    tensors whose dimensions no memory could hold, windows near INT64_MAX;
  * non-finite or ill-typed scalars (scale, softcap, window);
  * devices: tensors on another device ("meta" stands in for one);
  * layouts: non-contiguous, transposed, overlapping (stride 0 and as_strided windows) inputs and masks;
  * dtypes: integer, float64, mixed, and requires_grad where torch forbids it;
  * empty and degenerate shapes (B, H, L, D or Dv = 0);
  * non-finite values: NaN and inf in q, k, v and the mask;
  * the raw ops (torch.ops.fusedattn.*) called directly with bad arguments: RuntimeError, never a crash.

Cases that could take the interpreter down (a wrap-around in a size computation writes past a buffer) run in a
subprocess, so a regression fails one test instead of killing the run.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedattn
from conftest import backend_params, device_for, max_abs_err, randn
from fusedattn.reference import attention_ref
from test_attention import check_backward, check_forward

fwd_op = torch.ops.fusedattn.attention_fwd
bwd_op = torch.ops.fusedattn.attention_bwd


def run_isolated(code: str, timeout: float = 300) -> str:
    """Runs `code` (after `import torch, fusedattn`) in a fresh interpreter; fails the test on a crash (signal),
    a non-zero exit or a timeout. Returns stdout."""
    script = (
        "import math, torch, fusedattn\nop = torch.ops.fusedattn.attention_fwd\n"
        "bwd = torch.ops.fusedattn.attention_bwd\n" + textwrap.dedent(code)
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"subprocess {'crashed with signal ' + str(-proc.returncode) if proc.returncode < 0 else 'failed'} "
        f"(rc {proc.returncode})\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _overcommit_refuses_absurd_allocations() -> bool:
    """True where the kernel's allocation of tens of TiB fails (Linux heuristic or strict overcommit). With
    vm.overcommit_memory=1 it could succeed and the test would page memory in until the OOM killer came."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() in ("0", "2")
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_element_offsets_beyond_int32(gen, dtype):
    """q, k, v have a batch stride of 2^31 elements in one storage, so batch 1 starts beyond int32 offsets. fp32 K
    is read in place (strided), bf16 K is converted: two code paths. Only the touched pages are ever mapped."""
    B, Hq, Hkv, Lq, Lk, D = 2, 2, 1, 5, 7, 8
    big = 2**31
    storage = torch.empty(big + 4096, dtype=dtype)  # 8 GiB (fp32) / 4 GiB (bf16) virtual, never touched whole

    def place(offset, shape):
        # (B, H, L, D) whose batch b starts at offset + b * 2^31
        t = storage.as_strided(shape, (big, shape[2] * shape[3], shape[3], 1), offset)
        t.copy_(randn(*shape, dtype=dtype, gen=gen))
        return t

    q = place(0, (B, Hq, Lq, D))
    k = place(512, (B, Hkv, Lk, D))
    v = place(1024, (B, Hkv, Lk, D))
    assert q.stride(0) * (B - 1) >= 2**31
    check_forward(q, k, v, causal="bottom_right")
    check_forward(q, k, v, causal="top_left")
    check_backward(q, k, v, gen, causal="bottom_right")
    # and exactly the numbers of contiguous copies
    out = fusedattn.attention(q, k, v, causal=True)
    out_c = fusedattn.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)
    # a stride inside one head (keys 2^30 elements apart): n * row_stride overflows int32 for n >= 2
    k2 = storage.as_strided((1, 1, 3, D), (0, 0, 2**30, 1), 2048)
    k2.copy_(randn(1, 1, 3, D, dtype=dtype, gen=gen))
    check_forward(q[:1, :1], k2, k2)


_HUGE = {
    # Lk = 2^62 keys, all one element: B*Hkv*Lk*Dv_pad wrapped around int64 to a 64-byte buffer (segfault).
    "Lk_2^62": "q = torch.zeros(1, 1, 1, 1); k = torch.zeros(1, 1, 1, 1).expand(1, 1, 2**62, 1)\nargs = (q, k, k)",
    # head dim 2^61: per-thread tiles of D x 64 floats would wrap.
    "D_2^61": "q = torch.zeros(1, 1, 1, 1).expand(1, 1, 1, 2**61); args = (q, q, q[..., :1])",
    # B * Hq * Lq = 2^62: the output itself is beyond int64 bytes (torch's allocator check).
    "B_Hq_2^31": "q = torch.zeros(1, 1, 1, 1).expand(2**31, 2**31, 1, 1); args = (q, q, q)",
}


@pytest.mark.parametrize("name", list(_HUGE))
def test_absurd_expanded_dims_raise(name):
    """Dimensions no memory can hold, made of one stride-0 element: a clear RuntimeError from the public function,
    the raw forward and the raw backward, never a wrap-around (the process must survive)."""
    out = run_isolated(
        _HUGE[name]
        + "\n"
        + textwrap.dedent("""
    q, k, v = args
    def call(name, f):
        try:
            f()
        except (RuntimeError, MemoryError) as e:
            print(name, "raised", type(e).__name__, str(e).splitlines()[0][:200])
        else:
            print(name, "RETURNED")
    call("public", lambda: fusedattn.attention(q, k, v))
    call("fwd", lambda: op(q, k, v, None, 1.0, -1, -1, True, 0.0))
    B, Hq, Lq, _ = q.shape
    o = torch.zeros(1, 1, 1, 1).expand(B, Hq, Lq, v.shape[-1])
    lse = torch.zeros(1, 1, 1).expand(B, Hq, Lq)
    call("bwd", lambda: bwd(o, q, k, v, o, lse, None, 1.0, -1, -1, True, 0.0, None))
    """)
    )
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(" raised " in line for line in lines), out
    assert all("too large" in line or "memory" in line.lower() or "overflow" in line.lower() for line in lines), out


@pytest.mark.skipif(
    not _overcommit_refuses_absurd_allocations(),
    reason="vm.overcommit_memory=1: the allocation of tens of TiB could succeed and then be paged in",
)
@pytest.mark.parametrize("which", ["Lk_2^40", "Lq_2^40"])
def test_unallocatable_expanded_dims_raise(which):
    """Within int64 but beyond any memory: the kernel's scratch (Lk) or the output (Lq) cannot be allocated,
    which must be a clear error."""
    shape = "(1, 1, 1, 1), (1, 1, 2**40, 1)" if which == "Lk_2^40" else "(1, 1, 2**40, 1), (1, 1, 1, 1)"
    out = run_isolated(f"""
    qs, ks = {shape}
    q = torch.zeros(1, 1, 1, 1).expand(*qs); k = torch.zeros(1, 1, 1, 1).expand(*ks)
    try:
        fusedattn.attention(q, k, k)
    except (RuntimeError, MemoryError) as e:
        print("raised", str(e).splitlines()[0][:200])
    """)
    assert out.startswith("raised") and "memory" in out.lower(), out


@pytest.mark.parametrize("window", [(2**63 - 1, 2**63 - 1), (-1, 2**63 - 1), (2**63 - 1, 0), (2**62, 2**40)])
def test_window_near_int64_max_is_unbounded(gen, window):
    """A window wider than the sequences hides nothing; near INT64_MAX the band arithmetic must not wrap. (Compared
    with the kernel's own unbounded window: the reference's int64 band arithmetic wraps there too.)"""
    q, k, v = randn(2, 4, 9, 16, gen=gen), randn(2, 2, 13, 16, gen=gen), randn(2, 2, 13, 16, gen=gen)
    same = (window[0] if window[0] < 2**40 else -1, window[1] if window[1] < 2**40 else -1)
    check_forward(q, k, v, causal="none", window=same)
    for bottom_right in (True, False):
        got = fwd_op(q, k, v, None, 0.25, window[0], window[1], bottom_right, 0.0)
        want = fwd_op(q, k, v, None, 0.25, same[0], same[1], bottom_right, 0.0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    g = randn(2, 4, 9, 16, gen=gen)
    got = torch.autograd.grad(fusedattn.attention(*leaves, window=window), leaves, g)
    want = torch.autograd.grad(fusedattn.attention(*leaves, window=same), leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("window", [(2**63, 0), (0, 2**64), (-(2**63), 0)])
def test_window_beyond_int64(gen, window):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    with pytest.raises(ValueError, match="window"):
        fusedattn.attention(q, k, v, window=window)
    with pytest.raises(RuntimeError, match="window"):
        fwd_op(q, k, v, None, 1.0, window[0], window[1], True, 0.0)


def test_band_exact_beyond_2_24_keys():
    """Window (0, 0), causal: query i sees exactly key i + Lk - Lq. Keys past 2^24 must still be told apart.
    K is one expanded row (every score equal), so the output is the mean of the visible values."""
    Lk = 2**24 + 2
    q = torch.zeros(1, 1, 2, 1)
    k = torch.zeros(1, 1, 1, 1).expand(1, 1, Lk, 1)
    v = (torch.arange(Lk) % 7).float().view(1, 1, Lk, 1)
    out = fusedattn.attention(q, k, v, causal=True, window=(0, 0))
    expected = v[0, 0, -2:, 0]
    assert out.flatten().tolist() == expected.tolist()


# ---------------------------------------------------------------------------------------------- scalars


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scale(gen, scale):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    with pytest.raises(ValueError, match="scale"):
        fusedattn.attention(q, k, v, scale=scale)
    with pytest.raises(RuntimeError, match="scale"):
        fwd_op(q, k, v, None, scale, -1, -1, True, 0.0)
    out, lse = fwd_op(q, k, v, None, 0.5, -1, -1, True, 0.0)
    with pytest.raises(RuntimeError, match="scale"):
        bwd_op(out, q, k, v, out, lse, None, scale, -1, -1, True, 0.0, None)


@pytest.mark.parametrize("scale", [1e8, -1e8, 1e-30, -1e-30, 0.0])
def test_extreme_finite_scale(gen, scale):
    """A huge scale makes the softmax one-hot, a tiny one uniform: still the reference's answer."""
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    check_forward(q, k, v, scale=scale)
    if abs(scale) <= 1:  # with a one-hot softmax, dq is rounding noise times the scale (exactly 0 in autograd)
        check_backward(q, k, v, gen, scale=scale)


@pytest.mark.parametrize("scale", [1e10, -1e30])
def test_scores_beyond_1e9(gen, scale):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    check_forward(q, k, v, scale=scale)


@pytest.mark.parametrize("softcap", [math.nan, math.inf, -1.0])
def test_bad_softcap_raw_op(gen, softcap):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    with pytest.raises(RuntimeError, match="softcap"):
        fwd_op(q, k, v, None, 1.0, -1, -1, True, softcap)


@pytest.mark.parametrize("window", [(-2, 0), (0, -2), (-(2**62), -1), (1.5, 0), ("3", 0), (True, 0), (3,), None])
def test_bad_window(gen, window):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    with pytest.raises(ValueError, match="window"):
        fusedattn.attention(q, k, v, window=window)


@pytest.mark.parametrize("left,right", [(-2, -1), (-1, -5), (-(2**63), 0)])
def test_negative_window_raw_op(gen, left, right):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    with pytest.raises(RuntimeError, match="window"):
        fwd_op(q, k, v, None, 1.0, left, right, True, 0.0)


# ---------------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("which", ["q", "k", "v", "attn_mask"])
def test_mismatched_devices_public(gen, which):
    t = dict(
        q=randn(1, 2, 5, 8, gen=gen),
        k=randn(1, 2, 7, 8, gen=gen),
        v=randn(1, 2, 7, 8, gen=gen),
        attn_mask=torch.zeros(5, 7),
    )
    t[which] = t[which].to("meta")
    with pytest.raises(ValueError, match="device|on cpu|on meta"):
        fusedattn.attention(t["q"], t["k"], t["v"], attn_mask=t["attn_mask"])


def test_all_meta_raw_op_gives_shapes(gen):
    """All inputs on "meta": the fake implementation answers with shapes (what torch.compile relies on)."""
    q, k, v = (
        t.to("meta") for t in (randn(2, 4, 5, 8, gen=gen), randn(2, 2, 7, 8, gen=gen), randn(2, 2, 7, 12, gen=gen))
    )
    out, lse = fwd_op(q, k, v, None, 1.0, -1, -1, True, 0.0)
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 12) and lse.shape == (2, 4, 5)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize(
    "op,which", [("fwd", "k"), ("fwd", "v"), ("fwd", "attn_mask"), ("bwd", "grad_out"), ("bwd", "lse")]
)
def test_mismatched_devices_raw_op(gen, op, which):
    t = dict(
        q=randn(1, 2, 5, 8, gen=gen),
        k=randn(1, 2, 7, 8, gen=gen),
        v=randn(1, 2, 7, 8, gen=gen),
        attn_mask=torch.zeros(5, 7),
    )
    if op == "fwd":
        t[which] = t[which].to("meta")
        with pytest.raises(RuntimeError, match="device"):
            fwd_op(t["q"], t["k"], t["v"], t["attn_mask"], 1.0, -1, -1, True, 0.0)
    else:
        out, lse = fwd_op(t["q"], t["k"], t["v"], None, 1.0, -1, -1, True, 0.0)
        t.update(grad_out=out, lse=lse)
        t[which] = t[which].to("meta")
        with pytest.raises(RuntimeError, match="device"):
            bwd_op(t["grad_out"], t["q"], t["k"], t["v"], out, t["lse"], None, 1.0, -1, -1, True, 0.0, None)


# ---------------------------------------------------------------------------------------------- layouts


def _layouts(gen, dtype):
    """name -> (q, k, v): non-contiguous and overlapping (stride-0 / as_strided) inputs."""
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 11, 13, 16
    base = randn(4096, dtype=dtype, gen=gen)
    return {
        # (B, L, H, D) storage seen as (B, H, L, D)
        "transposed": (
            randn(B, Lq, Hq, D, dtype=dtype, gen=gen).transpose(1, 2),
            randn(B, Lk, Hkv, D, dtype=dtype, gen=gen).transpose(1, 2),
            randn(B, Lk, Hkv, D, dtype=dtype, gen=gen).transpose(1, 2),
        ),
        # every other (third) element of the head dim, every other key
        "strided_head_dim": (
            randn(B, Hq, Lq, 2 * D, dtype=dtype, gen=gen)[..., ::2],
            randn(B, Hkv, Lk, 3 * D, dtype=dtype, gen=gen)[..., ::3],
            randn(B, Hkv, 2 * Lk, D, dtype=dtype, gen=gen)[:, :, ::2],
        ),
        # stride 0: one query row for every position, one key/value row for every key, a shared batch
        "expanded": (
            randn(1, Hq, 1, D, dtype=dtype, gen=gen).expand(B, Hq, Lq, D),
            randn(B, Hkv, 1, D, dtype=dtype, gen=gen).expand(B, Hkv, Lk, D),
            randn(1, 1, Lk, D, dtype=dtype, gen=gen).expand(B, Hkv, Lk, D),
        ),
        # head dim of stride 0 (all D entries of a row equal)
        "expanded_head_dim": (
            randn(B, Hq, Lq, 1, dtype=dtype, gen=gen).expand(B, Hq, Lq, D),
            randn(B, Hkv, Lk, 1, dtype=dtype, gen=gen).expand(B, Hkv, Lk, D),
            randn(B, Hkv, Lk, D, dtype=dtype, gen=gen),
        ),
        # overlapping sliding windows over one buffer: row i is base[i : i + D] (rows share elements)
        "overlapping_rows": (
            base.as_strided((B, Hq, Lq, D), (7, 3, 1, 1)),
            base.as_strided((B, Hkv, Lk, D), (5, 2, 1, 1), 100),
            base.as_strided((B, Hkv, Lk, D), (1, 1, 1, 1), 200),
        ),
        # q, k and v are the same tensor (self-attention without projections)
        "aliased_qkv": (lambda x: (x, x, x))(randn(B, Hkv, Lk, D, dtype=dtype, gen=gen)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "layout", ["transposed", "strided_head_dim", "expanded", "expanded_head_dim", "overlapping_rows", "aliased_qkv"]
)
def test_odd_strides_match_reference(gen, dtype, layout):
    q, k, v = _layouts(gen, dtype)[layout]
    for causal in ("none", "bottom_right", "top_left"):
        check_forward(q, k, v, causal=causal)
    check_backward(q, k, v, gen, causal="bottom_right")
    # and the same numbers as contiguous copies
    out = fusedattn.attention(q, k, v, causal=True)
    torch.testing.assert_close(
        out, fusedattn.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True), atol=0, rtol=0
    )


def test_gradient_flows_through_expanded_leaves(gen):
    """Leaves broadcast inside the graph (k shared by the batch): their gradient sums over the broadcast."""
    q = randn(2, 4, 9, 16, gen=gen, requires_grad=True)
    k1 = randn(1, 2, 11, 16, gen=gen, requires_grad=True)
    v1 = randn(1, 2, 11, 16, gen=gen, requires_grad=True)
    g = randn(2, 4, 9, 16, gen=gen)
    out = fusedattn.attention(q, k1.expand(2, -1, -1, -1), v1.expand(2, -1, -1, -1), causal=True)
    got = torch.autograd.grad(out, (q, k1, v1), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k1, v1))
    ref = attention_ref(
        q64, k64.expand(2, -1, -1, -1), v64.expand(2, -1, -1, -1), causal=True, compute_dtype=torch.float64
    )
    want = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mask_kind", ["transposed_bool", "transposed_float", "expanded_last_dim", "overlapping"])
def test_odd_mask_strides(gen, mask_kind):
    q, k, v = randn(2, 4, 9, 16, gen=gen), randn(2, 2, 13, 16, gen=gen), randn(2, 2, 13, 16, gen=gen)
    if mask_kind == "transposed_bool":
        mask = (torch.rand(13, 9, generator=gen) > 0.3).t()
    elif mask_kind == "transposed_float":
        mask = torch.randn(2, 4, 13, 9, generator=gen).transpose(-1, -2)
    elif mask_kind == "expanded_last_dim":  # the same bias for every key of a row (stride 0 along Lk)
        mask = torch.randn(2, 1, 9, 1, generator=gen).expand(2, 4, 9, 13)
    else:
        mask = torch.randn(200, generator=gen).as_strided((9, 13), (3, 1))
    assert not mask.is_contiguous()
    check_forward(q, k, v, attn_mask=mask)
    check_forward(q, k, v, causal="top_left", attn_mask=mask)
    check_backward(q, k, v, gen, attn_mask=mask)


# ---------------------------------------------------------------------------------------------- dtypes


def test_requires_grad_on_int_tensors_is_refused_by_torch():
    with pytest.raises(RuntimeError, match="floating point|complex"):
        torch.ones(1, 2, 5, 8, dtype=torch.long).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64])
def test_non_float_inputs(gen, dtype):
    q = randn(1, 2, 5, 8, gen=gen, requires_grad=True)
    k, v = randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    bad = (k * 3).to(dtype)
    with pytest.raises(ValueError):
        fusedattn.attention(q, bad, v)
    with pytest.raises(ValueError):
        fusedattn.attention(bad[:, :, :5], bad, bad)
    with pytest.raises(RuntimeError, match="dtype|float|Long|Int|Bool|Byte|Complex"):
        fwd_op(bad[:, :, :5], bad, bad, None, 1.0, -1, -1, True, 0.0)
    with pytest.raises(RuntimeError):
        fwd_op(q.detach(), bad, v, None, 1.0, -1, -1, True, 0.0)


def test_float64_and_mixed_dtypes(gen):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    with pytest.raises(RuntimeError, match="float32|Double"):
        fwd_op(q.double(), k.double(), v.double(), None, 1.0, -1, -1, True, 0.0)
    with pytest.raises(RuntimeError, match="float64|supports"):
        fusedattn.attention(q.double(), k.double(), v.double(), backend="cpu")
    with pytest.warns(UserWarning, match="reference"):  # "auto": visible fallback, the right answer
        out = fusedattn.attention(q.double(), k.double(), v.double())
    ref = attention_ref(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # the reference backend computes in float32
    for kk, vv in ((k.half(), v), (k, v.bfloat16()), (k.half(), v.half())):
        with pytest.raises(ValueError, match="dtype"):
            fusedattn.attention(q, kk, vv)
        with pytest.raises(RuntimeError, match="dtype"):
            fwd_op(q, kk, vv, None, 1.0, -1, -1, True, 0.0)


@pytest.mark.parametrize("mask_dtype", [torch.int32, torch.int64, torch.uint8, torch.complex64])
def test_non_float_mask(gen, mask_dtype):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    mask = torch.ones(5, 7, dtype=mask_dtype)
    with pytest.raises(ValueError, match="attn_mask"):
        fusedattn.attention(q, k, v, attn_mask=mask)
    with pytest.raises(RuntimeError, match="attn_mask"):
        fwd_op(q, k, v, mask, 1.0, -1, -1, True, 0.0)


def test_mask_of_other_float_dtype(gen):
    """A float64 (or fp16 on fp32 inputs) additive mask is converted, not rejected."""
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    mask = torch.randn(5, 7, generator=gen)
    for m in (mask.double(), mask.half()):
        out = fusedattn.attention(q, k, v, attn_mask=m)
        ref = attention_ref(q.double(), k.double(), v.double(), attn_mask=m.double(), compute_dtype=torch.float64)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- empty / degenerate


@pytest.mark.parametrize("shape", ["B0", "Lq0", "Lk0", "D0", "Dv0", "D0_Dv0", "all0"])
@pytest.mark.parametrize("causal", ["none", "bottom_right", "top_left"])
def test_empty_and_degenerate(gen, shape, causal):
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 5, 7, 8, 6
    B, Lq, Lk, D, Dv = {
        "B0": (0, Lq, Lk, D, Dv),
        "Lq0": (B, 0, Lk, D, Dv),
        "Lk0": (B, Lq, 0, D, Dv),
        "D0": (B, Lq, Lk, 0, Dv),
        "Dv0": (B, Lq, Lk, D, 0),
        "D0_Dv0": (B, Lq, Lk, 0, 0),
        "all0": (0, 0, 0, 0, 0),
    }[shape]
    q = randn(B, Hq, Lq, D, gen=gen)
    k, v = randn(B, Hkv, Lk, D, gen=gen), randn(B, Hkv, Lk, Dv, gen=gen)
    # D = 0: the default scale 1/sqrt(D) is undefined; every score is 0 (a uniform softmax) whatever the scale
    check_forward(q, k, v, causal=causal, scale=1.0)
    check_backward(q, k, v, gen, causal=causal, scale=1.0)


def test_zero_heads(gen):
    q, k, v = randn(2, 0, 5, 8, gen=gen), randn(2, 0, 7, 8, gen=gen), randn(2, 0, 7, 8, gen=gen)
    with pytest.raises(ValueError, match="heads"):
        fusedattn.attention(q, k, v)
    out, lse = fwd_op(q, k, v, None, 1.0, -1, -1, True, 0.0)  # raw op: a valid empty result
    assert out.shape == (2, 0, 5, 8) and lse.shape == (2, 0, 5)
    with pytest.raises(RuntimeError, match="heads"):
        fwd_op(randn(2, 4, 5, 8, gen=gen), k, v, None, 1.0, -1, -1, True, 0.0)


# ---------------------------------------------------------------------------------------------- non-finite values


def _nan_rows(t):
    return t.isnan().any(-1) if t.dim() == 4 else t.isnan()


@pytest.mark.parametrize("where", ["q", "k", "v", "mask_nan", "q_inf"])
@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_non_finite_values_propagate_like_reference(gen, where, causal):
    """NaN is not sanitized: out is NaN exactly where the reference's is (for q, k: the rows that see the bad
    score; for v: every row, as 0 * NaN in P.V is NaN), never elsewhere; finite rows match the reference."""
    q, k, v = randn(2, 4, 9, 16, gen=gen), randn(2, 2, 11, 16, gen=gen), randn(2, 2, 11, 16, gen=gen)
    mask = None
    if where == "q":
        q[1, 2, 4, 3] = math.nan
    elif where == "k":
        k[0, 1, 6, 0] = math.nan
    elif where == "v":
        v[1, 0, 2, 5] = math.nan
    elif where == "mask_nan":
        mask = torch.zeros(9, 11)
        mask[3, 4] = math.nan
    elif where == "q_inf":
        q[0, 0, 2, :] = math.inf
    c = causal == "bottom_right"
    out, lse = fusedattn.attention(q, k, v, causal=c, attn_mask=mask, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, causal=c, attn_mask=mask, return_lse=True)
    assert torch.equal(_nan_rows(out), _nan_rows(ref)), "NaN rows differ from the reference"
    assert torch.equal(lse.isnan(), ref_lse.isnan()), "NaN lse entries differ from the reference"
    ok = ~_nan_rows(ref)
    torch.testing.assert_close(out[ok], ref[ok], atol=1e-5, rtol=1e-5)


def test_nan_key_hidden_by_bool_mask(gen):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    k[0, :, 3, 0] = math.nan
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[:3, 3] = False
    out = fusedattn.attention(q, k, v, attn_mask=mask)
    ref = attention_ref(q, k, v, attn_mask=mask)
    assert torch.equal(_nan_rows(out), _nan_rows(ref))


@pytest.mark.parametrize("where", ["mask_plus_inf", "score_overflow"])
def test_plus_inf_scores(gen, where):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen).abs()
    mask = None
    if where == "mask_plus_inf":
        mask = torch.zeros(5, 7)
        mask[2, :] = math.inf
    else:  # finite inputs whose products overflow: key 3 scores +inf for every query
        q = q.abs() + 1
        k[0, 0, 3, :] = 3e38
    out, lse = fusedattn.attention(q, k, v, attn_mask=mask, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(_nan_rows(out), _nan_rows(ref))
    assert torch.equal(lse.isnan(), ref_lse.isnan())


def test_nan_does_not_leak_through_backward(gen):
    """A NaN query row gives NaN gradients for that row and its keys' rows, but dq of other rows stays finite
    where the reference's does."""
    q, k, v = randn(1, 2, 6, 8, gen=gen), randn(1, 2, 6, 8, gen=gen), randn(1, 2, 6, 8, gen=gen)
    q[0, 1, 2, 0] = math.nan
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fusedattn.attention(*leaves, causal=True)
    dq = torch.autograd.grad(out.sum(), leaves[0])[0]
    leaves_r = [t.clone().requires_grad_() for t in (q, k, v)]
    dq_ref = torch.autograd.grad(attention_ref(*leaves_r, causal=True).sum(), leaves_r[0])[0]
    assert torch.equal(dq.isnan(), dq_ref.isnan())


# ---------------------------------------------------------------------------------------------- raw ops, bad arguments


def _raw_fwd_cases(gen):
    q, k, v = randn(2, 4, 5, 8, gen=gen), randn(2, 2, 7, 8, gen=gen), randn(2, 2, 7, 12, gen=gen)
    ok = (q, k, v, None, 1.0, -1, -1, True, 0.0)

    def with_(**kw):
        names = ("q", "k", "v", "attn_mask", "scale", "window_left", "window_right", "bottom_right", "softcap")
        args = dict(zip(names, ok))
        args.update(kw)
        return tuple(args[n] for n in names)

    return {
        "q_3d": with_(q=q[0]),
        "k_5d": with_(k=k[None]),
        "v_2d": with_(v=v[0, 0]),
        "q_0d": with_(q=torch.tensor(1.0)),
        "batch": with_(k=k[:1], v=v[:1]),
        "kv_heads_differ": with_(v=v[:, :1]),
        "heads_not_divisible": with_(k=randn(2, 3, 7, 8, gen=gen), v=randn(2, 3, 7, 12, gen=gen)),
        "head_dim": with_(k=randn(2, 2, 7, 9, gen=gen)),
        "kv_length": with_(v=randn(2, 2, 6, 12, gen=gen)),
        "mask_shape": with_(attn_mask=torch.zeros(5, 6)),
        "mask_5d": with_(attn_mask=torch.zeros(1, 2, 4, 5, 7)),
        "mask_too_many_heads": with_(attn_mask=torch.zeros(2, 8, 5, 7)),
        "scale_nan": with_(scale=math.nan),
        "softcap_neg": with_(softcap=-0.5),
        "window_neg": with_(window_left=-3),
    }


@pytest.mark.parametrize("name", list(_raw_fwd_cases(torch.Generator().manual_seed(0))))
def test_raw_fwd_bad_arguments(gen, name):
    args = _raw_fwd_cases(gen)[name]
    with pytest.raises(RuntimeError, match="fusedattn"):
        fwd_op(*args)


@pytest.mark.parametrize(
    "args",
    [
        ("not a tensor",),
        (None, None, None, None, 1.0, -1, -1, True, 0.0),
        ("q", "k", "v", None, 1.0, -1, -1, True, 0.0),
    ],
    ids=["too_few", "none_tensors", "strings"],
)
def test_raw_fwd_wrong_types(gen, args):
    with pytest.raises((RuntimeError, TypeError)):
        fwd_op(*args)


def test_raw_fwd_wrong_scalar_types(gen):
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    for bad in [("scale", "x"), ("window_left", 1.5), ("window_right", None), ("bottom_right", "yes")]:
        args = dict(
            q=q, k=k, v=v, attn_mask=None, scale=1.0, window_left=-1, window_right=-1, bottom_right=True, softcap=0.0
        )
        args[bad[0]] = bad[1]
        with pytest.raises((RuntimeError, TypeError)):
            fwd_op(*args.values())


def _raw_bwd_cases(gen):
    q, k, v = randn(2, 4, 5, 8, gen=gen), randn(2, 2, 7, 8, gen=gen), randn(2, 2, 7, 12, gen=gen)
    out, lse = fwd_op(q, k, v, None, 1.0, -1, -1, True, 0.0)
    names = (
        "grad_out",
        "q",
        "k",
        "v",
        "out",
        "lse",
        "attn_mask",
        "scale",
        "window_left",
        "window_right",
        "bottom_right",
        "softcap",
        "grad_lse",
    )
    ok = dict(zip(names, (out, q, k, v, out, lse, None, 1.0, -1, -1, True, 0.0, None)))

    def with_(**kw):
        args = dict(ok)
        args.update(kw)
        return tuple(args[n] for n in names)

    return {
        "grad_out_shape": with_(grad_out=out[:, :, :4]),
        "grad_out_dtype": with_(grad_out=out.double()),
        "grad_out_int": with_(grad_out=out.long()),
        "out_shape": with_(out=out[..., :5]),
        "lse_shape": with_(lse=lse[..., :4]),
        "lse_dtype": with_(lse=lse.double()),
        "lse_bf16": with_(lse=lse.bfloat16()),
        "grad_lse_shape": with_(grad_lse=lse[:1]),
        "q_shape": with_(q=q[:, :, :4]),
        "k_head_dim": with_(k=randn(2, 2, 7, 9, gen=gen)),
        "mask_shape": with_(attn_mask=torch.zeros(5, 6)),
        "scale_inf": with_(scale=math.inf),
        "window_neg": with_(window_right=-7),
        "softcap_nan": with_(softcap=math.nan),
    }


@pytest.mark.parametrize("name", list(_raw_bwd_cases(torch.Generator().manual_seed(0))))
def test_raw_bwd_bad_arguments(gen, name):
    args = _raw_bwd_cases(gen)[name]
    with pytest.raises(RuntimeError, match="fusedattn"):
        bwd_op(*args)


def test_raw_bwd_odd_but_valid_arguments(gen):
    """Strided grad_out, non-contiguous lse, a grad_lse of another float dtype: accepted, and correct."""
    q, k, v = randn(2, 4, 5, 8, gen=gen), randn(2, 2, 7, 8, gen=gen), randn(2, 2, 7, 12, gen=gen)
    out, lse = fwd_op(q, k, v, None, 0.5, -1, 0, True, 0.0)
    g = randn(2, 5, 4, 12, gen=gen).transpose(1, 2)
    g_lse = randn(2, 5, 4, gen=gen).transpose(1, 2)
    lse_t = lse.transpose(1, 2).contiguous().transpose(1, 2)
    got = bwd_op(g, q, k, v, out, lse_t, None, 0.5, -1, 0, True, 0.0, g_lse.double())
    want = bwd_op(g.contiguous(), q, k, v, out, lse, None, 0.5, -1, 0, True, 0.0, g_lse.contiguous())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, l64 = attention_ref(q64, k64, v64, causal=True, scale=0.5, return_lse=True, compute_dtype=torch.float64)
    ref = torch.autograd.grad((o64, l64), (q64, k64, v64), (g.double(), g_lse.double()))
    for a, b in zip(got, ref):
        assert max_abs_err(a, b) < 1e-4


# ---------------------------------------------------------------------------------------------- environment knobs

# The CPU kernels' block-size knobs (csrc/cpu/kernel_utils.h): a value out of range or not a whole number raises a
# RuntimeError naming the variable (on every call, before any tensor is touched); a valid one, rounded up to the
# kernel's multiple, gives the same numbers as the default. They are read once per process, hence a subprocess.
_KNOB_SCRIPT = """
import os, sys, torch, fusedattn
from fusedattn.reference import attention_ref
knob, op = sys.argv[1], sys.argv[2]
g = torch.Generator().manual_seed(0)
if op == "attention":
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    call = lambda: torch.ops.fusedattn.attention_fwd(q, k, v, None, 0.25, -1, 0, True, 0.0)[0]
    want = attention_ref(q, k, v, causal=True, scale=0.25, compute_dtype=torch.float64)
else:  # decode: 70 cached keys + 1 appended; the knob is read before the append
    q = torch.randn(2, 1, 4, 16, generator=g)
    k_cache, v_cache = (torch.randn(2, 80, 2, 16, generator=g) for _ in range(2))
    k_new, v_new = (torch.randn(2, 1, 2, 16, generator=g) for _ in range(2))
    seqlens = torch.tensor([70, 70], dtype=torch.int32)
    k_before = k_cache.clone()
    call = lambda: torch.ops.fusedattn.decode_fwd(q, k_cache, v_cache, seqlens, k_new, v_new, None, None, 0.25,
                                                  -1, 0, 0.0, 0)[0]
    kk = torch.cat([k_cache[:, :70], k_new], 1).repeat_interleave(2, 2).transpose(1, 2)
    vv = torch.cat([v_cache[:, :70], v_new], 1).repeat_interleave(2, 2).transpose(1, 2)
    want = attention_ref(q.transpose(1, 2), kk, vv, scale=0.25, compute_dtype=torch.float64).transpose(1, 2)
for bad in [str(2**62), str(2**63 - 1), str(2**64), "5000", "0", "-3", "12abc", "abc", " "]:
    os.environ[knob] = bad
    try:
        call()
    except RuntimeError as e:
        assert knob in str(e), str(e)
    else:
        raise AssertionError(f"{knob}={bad!r} was accepted")
    if op == "decode":
        assert torch.equal(k_cache, k_before), "the append ran before the knob was checked"
os.environ[knob] = "7"  # valid: rounded up to the kernel's multiple
err = (call().double() - want).abs().max().item()
assert err < 1e-5, err
print("OK")
"""


@pytest.mark.parametrize(
    "knob,op", [("FUSEDATTN_CPU_BLOCK_N", "attention"), ("FUSEDATTN_CPU_DECODE_BLOCK_N", "decode")]
)
def test_block_size_knobs_refuse_bad_values(knob, op):
    import os

    env = {n: val for n, val in os.environ.items() if not n.startswith("FUSEDATTN_CPU_")}
    proc = subprocess.run(
        [sys.executable, "-c", _KNOB_SCRIPT, knob, op],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, (
        f"rc {proc.returncode} ({'signal ' + str(-proc.returncode) if proc.returncode < 0 else 'exit'})\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def test_raw_varlen_refuses_v_with_other_tokens_than_k(gen):
    """The packed layout's token axis is 0: a v with fewer (or more) tokens than k is refused before any read."""
    q, k = randn(6, 2, 8, gen=gen), randn(6, 2, 8, gen=gen)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    for v in (randn(3, 2, 8, gen=gen), randn(9, 2, 8, gen=gen)):
        with pytest.raises(RuntimeError, match="v must have k's tokens"):
            torch.ops.fusedattn.varlen_fwd(q, k, v, cu, cu, 4, 4, 0.5, -1, -1, True, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Double backward: the fused backward is first-order only. With create_graph=True the first-order gradients are
# still right, but differentiating them again must raise (it used to drop the second-order term silently: a
# Hessian-vector product of None or off by 3-50 from the float64 reference).
# ----------------------------------------------------------------------------------------------------------------


def _double_backward_calls():
    lens = torch.tensor([0, 3, 8], dtype=torch.int32)
    return {
        "attention": (lambda q, k, v, be: fusedattn.attention(q, k, v, causal=True, backend=be), (1, 2, 5, 8)),
        "varlen": (lambda q, k, v, be: fusedattn.varlen_attention(q, k, v, lens, lens, 5, 5, backend=be), (8, 2, 8)),
        "sdpa": (lambda q, k, v, be: fusedattn.scaled_dot_product_attention(q, k, v), (1, 2, 5, 8)),
    }


@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"]))
@pytest.mark.parametrize("fn", ["attention", "varlen", "sdpa"])
def test_double_backward_raises(backend, fn, gen):
    if fn == "sdpa" and backend != "cpu":
        pytest.skip("the drop-in picks its kernel itself (cpu tensors: the cpu kernel)")
    call, shape = _double_backward_calls()[fn]
    dev = device_for(backend)
    q, k, v = (randn(*shape, gen=gen).to(dev).requires_grad_() for _ in range(3))
    out = call(q, k, v, None if fn == "sdpa" else backend)
    (g_first,) = torch.autograd.grad(out.square().sum(), q, retain_graph=True)
    (g_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    torch.testing.assert_close(g_q.detach(), g_first)  # the first order is unchanged
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(g_q.sum(), k)


# ----------------------------------------------------------------------------------------------------------------
# A window side near 2**63 (sys.maxsize as "unbounded") is unbounded on every backend: i + off + right + 1
# overflowed int64 in the CPU and Triton decode and in the reference (rows of zeros, error ~1).
# ----------------------------------------------------------------------------------------------------------------

_MAXSIZE = sys.maxsize


@pytest.mark.parametrize("backend", backend_params(["cpu", "triton", "reference"]))
@pytest.mark.parametrize("window", [(_MAXSIZE, _MAXSIZE), (-1, _MAXSIZE), (_MAXSIZE, -1), (3, _MAXSIZE), (_MAXSIZE, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_window_sides_are_unbounded(backend, window, causal, gen):
    dev = device_for(backend)
    bounded = tuple(-1 if w == _MAXSIZE else w for w in window)
    q, k, v = randn(1, 4, 5, 16, gen=gen), randn(1, 2, 9, 16, gen=gen), randn(1, 2, 9, 16, gen=gen)
    out = fusedattn.attention(*(t.to(dev) for t in (q, k, v)), causal=causal, window=window, backend=backend)
    ref = attention_ref(q, k, v, causal=causal, window=bounded)
    assert max_abs_err(out.cpu(), ref) < 1e-5
    qd, kc, vc = randn(2, 3, 4, 16, gen=gen), randn(2, 20, 2, 16, gen=gen), randn(2, 20, 2, 16, gen=gen)
    lens = torch.tensor([7, 13], dtype=torch.int32)
    with torch.no_grad():
        out = fusedattn.decode_attention(
            *(t.to(dev) for t in (qd, kc, vc)),
            cache_seqlens=lens.to(dev),
            causal=causal,
            window=window,
            backend=backend,
        )
        ref = fusedattn.decode_attention(
            qd, kc, vc, cache_seqlens=lens, causal=causal, window=bounded, backend="reference"
        )
    assert max_abs_err(out.cpu(), ref) < 1e-5


# --- issue 20: caches, aliasing, storage ---
# decode's in-place append into aliased caches (items 3), its in-place bookkeeping (4), the value rows of an append
# whose key head dim is 0 (5), freed storage under any op's tensor (7) and num_splits capped by the keys (9). Before
# the fix every aliasing case was accepted (an expanded cache raced, k_cache is v_cache overwrote the keys, a k_new
# viewing the cache gave a shifted copy), the CPU op left _version alone, the CPU op skipped v_new when D == 0, and a
# freed storage segfaulted (hence the subprocesses).
# ----------------------------------------------------------------------------------------------------------------

from conftest import raw_op, unavailable_reason  # noqa: E402 (this block's own import, beside the block)

_DECODE_BACKENDS = backend_params(["cpu", "triton", "reference"])
_DECODE_OPS = backend_params(["cpu", "triton"])  # the backends with a raw decode op of their own


def _decode_case(B=2, L=16, H=2, D=8, Dv=None, Lnew=1, gen=None):
    """q (B, 1, H, D), zero caches (B, L, H, D / Dv), k_new / v_new (B, Lnew, H, ..), 3 keys cached per sequence."""
    Dv = D if Dv is None else Dv
    return dict(
        q=randn(B, 1, H, D, gen=gen),
        k_cache=torch.zeros(B, L, H, D),
        v_cache=torch.zeros(B, L, H, Dv),
        k_new=randn(B, Lnew, H, D, gen=gen),
        v_new=randn(B, Lnew, H, Dv, gen=gen),
        lens=torch.full((B,), 3, dtype=torch.int32),
    )


def _public_decode(c, backend, **kw):
    dev = device_for(backend)
    with torch.no_grad():
        return fusedattn.decode_attention(
            c["q"].to(dev),
            c["k_cache"],
            c["v_cache"],
            cache_seqlens=c["lens"].to(dev),
            k_new=c["k_new"],
            v_new=c["v_new"],
            backend=backend,
            **kw,
        )


def _raw_decode(op, c, num_splits=0):
    return op(
        c["q"], c["k_cache"], c["v_cache"], c["lens"], c["k_new"], c["v_new"], None, None, 0.5, -1, -1, 0.0, num_splits
    )


def _aliased(case: str, gen) -> dict:
    """A decode call whose append writes memory that something else also names."""
    c = _decode_case(gen=gen)
    B, L, H, D = c["k_cache"].shape
    if case == "cache expanded over kv heads":
        c["k_cache"] = torch.zeros(B, L, 1, D).expand(B, L, H, D)
    elif case == "cache expanded over the batch":
        c["v_cache"] = torch.zeros(1, L, H, D).expand(B, L, H, D)
    elif case == "k_cache is v_cache":
        c["v_cache"] = c["k_cache"]
    elif case == "caches overlap partially":
        flat = torch.zeros(B * L * H * D + 8)
        c["k_cache"], c["v_cache"] = flat[: B * L * H * D].view(B, L, H, D), flat[8:].view(B, L, H, D)
    elif case == "k_new a view of the written rows (B = 1)":
        c = _decode_case(B=1, gen=gen)
        c["k_new"] = c["k_cache"][:, 2:3]  # one row before the written one: a shifted copy before the fix
    elif case == "v_new a view into a batched cache":
        c["v_new"] = c["v_cache"][:, 2:3]  # a slice of a (B = 2) cache: ATen's test finds it too hard
    elif case == "k_new a view into v_cache":
        c["k_new"] = c["v_cache"][:, 3:4]
    return c


_ALIASED = [
    "cache expanded over kv heads",
    "cache expanded over the batch",
    "k_cache is v_cache",
    "caches overlap partially",
    "k_new a view of the written rows (B = 1)",
    "v_new a view into a batched cache",
    "k_new a view into v_cache",
]


@pytest.mark.parametrize("case", _ALIASED)
@pytest.mark.parametrize("backend", _DECODE_BACKENDS)
def test_append_into_aliased_memory_raises_torchs_overlap_error(backend, case, gen):
    c = _aliased(case, gen)
    with pytest.raises(RuntimeError, match="unsupported operation: .*single memory location|same memory locations"):
        _public_decode(c, backend)


@pytest.mark.parametrize("case", _ALIASED)
@pytest.mark.parametrize("backend", _DECODE_OPS)
def test_raw_decode_op_refuses_aliased_append(backend, case, gen):
    op = raw_op("decode_fwd", backend)
    with pytest.raises(RuntimeError, match=rf"fusedattn \({backend}\): unsupported operation"):
        _raw_decode(op, _aliased(case, gen))


@pytest.mark.parametrize("backend", _DECODE_BACKENDS)
def test_interleaved_kv_caches_still_append(backend, gen):
    """k_cache and v_cache as the two halves of one (B, L, H, 2D) buffer share a storage without sharing an element:
    torch's overlap test calls that too hard to decide and lets it through; so does the append, correctly."""
    c = _decode_case(gen=gen)
    kv = torch.zeros(2, 16, 2, 16)
    c["k_cache"], c["v_cache"] = kv[..., :8], kv[..., 8:]
    ref = _decode_case(gen=gen)
    ref.update(q=c["q"], k_new=c["k_new"], v_new=c["v_new"])
    out = _public_decode(c, backend)
    expected = _public_decode(ref, "reference")
    assert max_abs_err(out.cpu(), expected) < 1e-5
    assert torch.equal(c["k_cache"][:, 3], c["k_new"][:, 0]) and torch.equal(c["v_cache"][:, 3], c["v_new"][:, 0])


@pytest.mark.parametrize("backend", _DECODE_BACKENDS)
def test_append_bumps_the_caches_versions(backend, gen):
    c = _decode_case(gen=gen)
    versions = c["k_cache"]._version, c["v_cache"]._version
    _public_decode(c, backend)
    assert c["k_cache"]._version > versions[0] and c["v_cache"]._version > versions[1]


@pytest.mark.parametrize("backend", _DECODE_OPS)
def test_raw_decode_op_bumps_versions_so_autograd_sees_the_append(backend, gen):
    """A cache saved for backward by another op, then appended into: backward must refuse (as after torch's own
    in-place writes), not return a gradient computed from the overwritten values."""
    op = raw_op("decode_fwd", backend)
    c = _decode_case(gen=gen)
    w = torch.ones(1, requires_grad=True)
    loss = (c["k_cache"] * w).sum()  # mul saves k_cache for w's gradient
    before = c["v_cache"]._version
    _raw_decode(op, c)
    assert c["v_cache"]._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", _DECODE_BACKENDS)
def test_append_into_inference_tensor_outside_inference_mode_raises(backend, gen):
    c = _decode_case(gen=gen)
    with torch.inference_mode():
        c["k_cache"], c["v_cache"] = torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        _public_decode(c, backend)
    assert not c["k_cache"].any() and not c["v_cache"].any()  # refused before anything was written
    if backend != "reference":
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
            _raw_decode(raw_op("decode_fwd", backend), c)
    with torch.inference_mode():  # inside inference mode the append is fine
        _public_decode(c, backend)
    assert torch.equal(c["v_cache"][:, 3], c["v_new"][:, 0])


@pytest.mark.parametrize("backend", _DECODE_BACKENDS)
def test_value_rows_are_appended_when_the_key_head_dim_is_0(backend, gen):
    """D = 0, Dv = 4: k_new has no data (a null pointer) but v_new has rows; the output reads them."""
    c = _decode_case(D=0, Dv=4, Lnew=2, gen=gen)
    c["v_cache"][:, :3] = randn(2, 3, 2, 4, gen=gen)
    ref = {k: v.clone() for k, v in c.items()}
    out = _public_decode(c, backend)
    assert torch.equal(c["v_cache"][:, 3:5], c["v_new"])
    expected = _public_decode(ref, "reference")  # scores all 0: the mean of the 5 value rows
    assert torch.allclose(expected, ref["v_cache"][:, :5].mean(1, keepdim=True))
    assert max_abs_err(out.cpu(), expected) < 1e-5


def test_num_splits_is_capped_by_the_keys_on_the_cpu():
    """1024 splits of 16 keys: 1024 partial states per (sequence, kv head), 1008+ of them empty, ~70x the time of
    16 splits before the cap. Now both run the same 16 splits: the same bits, about the same time."""
    import time

    g = torch.Generator().manual_seed(0)
    q, kc, vc = randn(64, 1, 8, 64, gen=g), randn(64, 16, 8, 64, gen=g), randn(64, 16, 8, 64, gen=g)
    lens = torch.full((64,), 16, dtype=torch.int32)

    def run(s):
        return torch.ops.fusedattn.decode_fwd(q, kc, vc, lens, None, None, None, None, 0.125, -1, -1, 0.0, s)

    assert torch.equal(run(1024)[0], run(16)[0]) and torch.equal(run(1024)[1], run(16)[1])

    def best(s):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run(s)
            times.append(time.perf_counter() - t0)
        return min(times)

    assert best(1024) < 4 * best(16) + 2e-3


@pytest.mark.parametrize("splits", [1024, 40])
def test_num_splits_is_capped_by_the_key_blocks_on_triton(splits, gen):
    """The Triton launcher runs at most cdiv(keys, BLOCK_N) splits (extra ones would be empty), same result."""
    kd = pytest.importorskip("fusedattn.kernels.decode")
    if device_for("triton") != "cpu":
        pytest.skip("launch spying runs the interpreter's launcher")
    grids = []

    def spy(kernel):
        class Launch:
            def __getitem__(self, grid):
                grids.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), grid))
                return kernel[grid]

        return Launch()

    c = _decode_case(B=2, L=16, H=2, D=16, Lnew=0, gen=gen)
    args = (c["q"], c["k_cache"], c["v_cache"], c["lens"], None, None, None, None, 0.25, -1, -1, 0.0)
    out, lse = kd._decode_impl(*args, splits, spy)
    split_grids = [grid for name, grid in grids if "split" in name]
    assert split_grids and all(grid[2] == 1 for grid in split_grids)  # 16 keys: one block, one split
    ref_out, ref_lse = kd._decode_impl(*args, 1, kd.launch)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


# Freed storage: every op's tensor arguments, one freed at a time, in a fresh process (it segfaulted before).
_FREED_SCRIPT = r"""
import sys, torch, fusedattn
from fusedattn import attention, decode_attention, merge_attention_states, varlen_attention
backend = sys.argv[1]
if backend == "triton":
    import fusedattn.kernels.decode  # registers the Triton ops
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g)

def calls():
    q, k, v = r(1, 2, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8)
    mask = torch.zeros(5, 7)
    yield "attention", dict(q=q, k=k, v=v, attn_mask=mask), lambda t: attention(
        t["q"], t["k"], t["v"], attn_mask=t["attn_mask"], backend=backend)
    if backend == "cpu":
        yield "drop-in", dict(q=q, k=k, v=v), lambda t: fusedattn.scaled_dot_product_attention(t["q"], t["k"], t["v"])
        cu = torch.tensor([0, 3, 5], dtype=torch.int32)
        yield "varlen", dict(q=r(5, 2, 8), k=r(5, 2, 8), v=r(5, 2, 8), cu_q=cu, cu_k=cu.clone()), lambda t: (
            varlen_attention(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"], 3, 3, backend=backend))
        op = torch.ops.fusedattn.attention_fwd
        yield "attention_fwd", dict(q=q, k=k, v=v), lambda t: op(t["q"], t["k"], t["v"], None, 0.3, -1, -1, True, 0.0)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    d = dict(q=r(2, 1, 2, 8), kc=r(2, 16, 2, 8), vc=r(2, 16, 2, 8), lens=lens, kn=r(2, 1, 2, 8), vn=r(2, 1, 2, 8))
    yield "decode", d, lambda t: decode_attention(
        t["q"], t["kc"], t["vc"], cache_seqlens=t["lens"], k_new=t["kn"], v_new=t["vn"], backend=backend)
    paged = dict(q=r(2, 1, 2, 8), kc=r(4, 4, 2, 8), vc=r(4, 4, 2, 8), lens=lens, bt=torch.tensor([[0, 1], [2, 3]],
                 dtype=torch.int32))
    yield "paged decode", paged, lambda t: decode_attention(
        t["q"], t["kc"], t["vc"], cache_seqlens=t["lens"], block_table=t["bt"], backend=backend)
    if backend != "reference":
        op = torch.ops.fusedattn.decode_fwd if backend == "cpu" else torch.ops.fusedattn.triton_decode_fwd
        yield "decode_fwd", d, lambda t: op(
            t["q"], t["kc"], t["vc"], t["lens"], t["kn"], t["vn"], None, None, 0.3, -1, -1, 0.0, 0)
        mop = torch.ops.fusedattn.merge_attention_states if backend == "cpu" else (
            torch.ops.fusedattn.triton_merge_attention_states)
        m = dict(oa=r(1, 3, 2, 8), la=r(1, 2, 3), ob=r(1, 3, 2, 8), lb=r(1, 2, 3))
        yield "merge op", m, lambda t: mop(t["oa"], t["la"], t["ob"], t["lb"])

refused = 0
for what, tensors, call in calls():
    for name in tensors:
        t = {k: x.clone() for k, x in tensors.items()}
        t[name].untyped_storage().resize_(0)
        try:
            with torch.no_grad():
                call(t)
        except RuntimeError as e:
            assert "storage" in str(e), (what, name, str(e))
            refused += 1
        else:
            raise AssertionError(f"{what}: freed {name} was accepted")
print("refused", refused)
"""


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_freed_storage_raises_instead_of_crashing(backend):
    if unavailable_reason(backend) is not None:
        pytest.skip(f"{backend} backend: {unavailable_reason(backend)}")
    if device_for(backend) != "cpu":
        pytest.skip("the CPU-tensor case (the interpreter for Triton)")
    proc = subprocess.run([sys.executable, "-c", _FREED_SCRIPT, backend], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"rc {proc.returncode} ({'signal ' + str(-proc.returncode) if proc.returncode < 0 else 'error'})\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    assert int(proc.stdout.split()[-1]) > 0
