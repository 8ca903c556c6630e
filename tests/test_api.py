"""Public API: the drop-in scaled_dot_product_attention against torch's, fallbacks, input validation, backend
selection, op registration, and a stock nn.TransformerEncoder running on the drop-in."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusedattn
import fusedattn.reference
from conftest import assert_close_2x, case_id, pairwise, randn
from fusedattn.reference import attention_ref

TORCH_SDPA = F.scaled_dot_product_attention  # captured before any test monkeypatches it


# ---------------------------------------------------------------------------------------------- drop-in vs torch


def _sdpa_inputs(case, gen):
    """Tensors and kwargs for one drop-in case; 3d means (N, L, E), 4d (B, H, L, E)."""
    Lq, Lk = case["lens"]
    dt = case["dtype"]
    shape = case["shape"]
    B, H = 2, 4
    Hkv = 2 if shape == "4d_gqa" else H
    if shape == "3d":
        q, k, v = (
            randn(B * H, Lq, 16, dtype=dt, gen=gen),
            randn(B * H, Lk, 16, dtype=dt, gen=gen),
            randn(B * H, Lk, 24, dtype=dt, gen=gen),
        )
        keypad_shape, full_shape = (B * H, 1, Lk), (B * H, Lq, Lk)
    else:
        q, k, v = (
            randn(B, H, Lq, 16, dtype=dt, gen=gen),
            randn(B, Hkv, Lk, 16, dtype=dt, gen=gen),
            randn(B, Hkv, Lk, 24, dtype=dt, gen=gen),
        )
        keypad_shape, full_shape = (B, 1, 1, Lk), (B, H, Lq, Lk)
    kwargs = dict(scale=case["scale"])
    if shape == "4d_gqa":
        kwargs["enable_gqa"] = True
    mask = case["mask"]
    if mask == "causal":
        kwargs["is_causal"] = True  # top-left, as torch
    elif mask.startswith("bool"):
        m = torch.rand(keypad_shape if mask == "bool_keypad" else (Lq, Lk), generator=gen) > 0.3
        m[..., 0] = True  # torch and fusedattn agree on empty rows (0) too, but keep them rare here
        kwargs["attn_mask"] = m
    elif mask.startswith("float"):
        m = torch.randn(full_shape if mask == "float_full" else (Lq, Lk), generator=gen)
        kwargs["attn_mask"] = m.to(dt)
    return q, k, v, kwargs


SDPA_GRID = pairwise(
    {
        "shape": ["3d", "4d", "4d_gqa"],
        "mask": ["none", "causal", "bool_2d", "bool_keypad", "float_2d", "float_full"],
        "lens": [(1, 1), (13, 13), (7, 29), (29, 7), (64, 64)],
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
        "scale": [None, 0.2],
    }
)


def _torch_ref_and_base(q, k, v, kwargs):
    """float64 torch SDPA (math) as ground truth, torch SDPA in the input dtype as the baseline."""
    kw64 = dict(kwargs)
    if "attn_mask" in kw64 and kw64["attn_mask"].is_floating_point():
        kw64["attn_mask"] = kw64["attn_mask"].double()
    with sdpa_kernel(SDPBackend.MATH):
        ref = TORCH_SDPA(q.double(), k.double(), v.double(), **kw64)
    base = TORCH_SDPA(q, k, v, **kwargs)
    return ref, base


@pytest.mark.parametrize("case", SDPA_GRID, ids=case_id)
def test_sdpa_matches_torch(case, gen):
    q, k, v, kwargs = _sdpa_inputs(case, gen)
    out = fusedattn.scaled_dot_product_attention(q, k, v, **kwargs)
    ref, base = _torch_ref_and_base(q, k, v, kwargs)
    assert out.shape == base.shape and out.dtype == base.dtype
    assert_close_2x(out, ref, base)


@pytest.mark.parametrize("case", [c for c in SDPA_GRID if c["dtype"] != torch.float16][:12], ids=case_id)
def test_sdpa_backward_matches_torch(case, gen):
    q, k, v, kwargs = _sdpa_inputs(case, gen)
    g = None
    results = []
    for fn, dtype in (
        (fusedattn.scaled_dot_product_attention, q.dtype),
        (TORCH_SDPA, torch.float64),
        (TORCH_SDPA, q.dtype),
    ):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        kw = dict(kwargs)
        if dtype == torch.float64 and "attn_mask" in kw and kw["attn_mask"].is_floating_point():
            kw["attn_mask"] = kw["attn_mask"].double()
        with sdpa_kernel(SDPBackend.MATH) if dtype == torch.float64 else contextlib.nullcontext():
            out = fn(*inputs, **kw)
        if g is None:
            g = randn(*out.shape, gen=gen).to(out.dtype)
        results.append(torch.autograd.grad(out, inputs, g.to(dtype)))
    for name, got, ref, base in zip(("dq", "dk", "dv"), *results):
        assert_close_2x(got, ref, base, factor=3, name=name)


def test_sdpa_enable_gqa_with_equal_heads_and_positional_args(gen):
    q, k, v = randn(2, 4, 9, 8, gen=gen), randn(2, 4, 11, 8, gen=gen), randn(2, 4, 11, 8, gen=gen)
    mask = torch.rand(9, 11, generator=gen) > 0.4
    mask[:, 0] = True
    # positional order as torch: attn_mask, dropout_p, is_causal, then keyword-only scale / enable_gqa
    out = fusedattn.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, mask, 0.0, False, scale=0.5), atol=1e-5, rtol=1e-5)


def test_sdpa_fully_masked_rows_are_zero_like_torch(gen):
    q, k, v = randn(2, 4, 6, 8, gen=gen), randn(2, 4, 5, 8, gen=gen), randn(2, 4, 5, 8, gen=gen)
    mask = torch.rand(6, 5, generator=gen) > 0.3
    mask[:, 0] = True
    mask[2] = False
    out = fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not out.isnan().any() and (out[:, :, 2] == 0).all()
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Bz,Lq,Lk", [(0, 5, 7), (2, 0, 7), (2, 5, 0)])
def test_sdpa_empty_inputs(gen, Bz, Lq, Lk):
    q, k, v = randn(Bz, 4, Lq, 8, gen=gen), randn(Bz, 4, Lk, 8, gen=gen), randn(Bz, 4, Lk, 8, gen=gen)
    out = fusedattn.scaled_dot_product_attention(q, k, v)
    assert out.shape == (Bz, 4, Lq, 8) and (out == 0).all()


# ---------------------------------------------------------------------------------------------- fallbacks

_FALLBACK_SCRIPT = textwrap.dedent("""
    import json, warnings
    import torch, torch.nn.functional as F
    import fusedattn
    result = {"ops": [n for n in ("attention_fwd", "attention_bwd") if hasattr(torch.ops.fusedattn, n)]}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:  # default filters: what a user would see
        outs = []
        for _ in range(2):
            torch.manual_seed(1)
            outs.append(fusedattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3))
        torch.manual_seed(1)
        expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        result["dropout_warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        result["dropout_matches_torch"] = all(torch.allclose(o, expected, atol=1e-6) for o in outs)
        result["dropout_not_identity"] = not torch.allclose(outs[0], F.scaled_dot_product_attention(q, k, v))
        del caught[:]
        q64, k64, v64 = q.double(), k.double(), v.double()
        outs = [fusedattn.scaled_dot_product_attention(q64, k64, v64, is_causal=True) for _ in range(2)]
        expected = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
        result["float64_warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        result["float64_dtype"] = str(outs[0].dtype)
        result["float64_matches_torch"] = all(torch.allclose(o, expected, atol=1e-12) for o in outs)
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def fresh_process():
    """A new interpreter: the fallback warnings are one-time, so they must be observed before anything else
    in this pytest process triggers them."""
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ops_registered_in_fresh_process(fresh_process):
    assert fresh_process["ops"] == ["attention_fwd", "attention_bwd"]


def test_dropout_falls_back_to_torch_with_one_warning(fresh_process):
    warns = fresh_process["dropout_warnings"]
    assert len(warns) == 1, f"expected one warning for two calls, got {warns}"
    assert "falling back" in warns[0].lower()
    assert fresh_process["dropout_matches_torch"] and fresh_process["dropout_not_identity"]


def test_float64_falls_back_to_torch_with_one_warning(fresh_process):
    warns = fresh_process["float64_warnings"]
    assert len(warns) == 1, f"expected one warning for two calls, got {warns}"
    assert "falling back" in warns[0].lower()
    assert fresh_process["float64_dtype"] == "torch.float64" and fresh_process["float64_matches_torch"]


def test_dropout_fallback_matches_torch_in_process(gen):
    """Whatever the one-time warning state, a dropout call gives torch's result under the same seed."""
    q, k, v = randn(1, 2, 8, 8, gen=gen), randn(1, 2, 8, 8, gen=gen), randn(1, 2, 8, 8, gen=gen)
    with warnings.catch_warnings(record=True):
        torch.manual_seed(3)
        out = fusedattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, dropout_p=0.5))


def test_ops_exist():
    assert hasattr(torch.ops.fusedattn, "attention_fwd")
    assert hasattr(torch.ops.fusedattn, "attention_bwd")
    schema = str(torch.ops.fusedattn.attention_fwd.default._schema)
    assert "Tensor? attn_mask" in schema and "bool bottom_right" in schema


def test_attention_ref_is_exported():
    assert fusedattn.attention_ref is fusedattn.reference.attention_ref


# ---------------------------------------------------------------------------------------------- validation
# fusedattn.attention validates at the boundary: ValueError naming the argument. The drop-in keeps torch's
# contract instead: where torch raises, it raises (torch's error, or a ValueError naming the argument); where
# torch accepts the call (it broadcasts batch dims, takes a NaN scale), it returns torch's result.

_NAME = {"q": r"(\bq\b|query)", "k": r"(\bk\b|key)", "v": r"(\bv\b|value)"}


def _raises(pattern, *words):
    """pytest.raises(ValueError) whose message matches `pattern` and contains each of `words`."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(ValueError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppress = self.ctx.__exit__(*exc)
            if not suppress:  # a different exception type: let it propagate as is
                return False
            msg = str(self.info.value)
            assert re.search(pattern, msg, re.IGNORECASE), f"{msg!r} does not name {pattern}"
            for w in words:
                assert w.lower() in msg.lower(), f"{msg!r} does not mention {w!r}"
            return suppress

    return _Check()


def _bad_inputs(gen):
    """name -> (q, k, v, kwargs, regex the ValueError must match, extra words) for each invalid call."""
    q, k, v = randn(2, 4, 5, 8, gen=gen), randn(2, 2, 7, 8, gen=gen), randn(2, 2, 7, 8, gen=gen)
    cases = {
        "rank": (q, k[0], v[0], {}, r"query|key|\bq\b|\bk\b", ()),
        "batch": (q, k[:1], v[:1], {}, _NAME["k"], ()),
        "head_dim": (q, randn(2, 2, 7, 16, gen=gen), v, {}, _NAME["k"], ()),
        "kv_length": (q, k, randn(2, 2, 6, 8, gen=gen), {}, _NAME["v"], ()),
        "heads_not_divisible": (q, randn(2, 3, 7, 8, gen=gen), randn(2, 3, 7, 8, gen=gen), {}, _NAME["k"], ()),
        "k_dtype": (q, k.bfloat16(), v, {}, _NAME["k"], ("dtype",)),
        "v_dtype": (q, k, v.half(), {}, _NAME["v"], ("dtype",)),
        "integer": (q.long(), k.long(), v.long(), {}, r"query|\bq\b|dtype|float", ()),
        "device": (q, k.to("meta"), v, {}, _NAME["k"], ("device",)),
        "scale_nan": (q, k, v, {"scale": math.nan}, "scale", ()),
        "scale_inf": (q, k, v, {"scale": math.inf}, "scale", ()),
        "scale_neg_inf": (q, k, v, {"scale": -math.inf}, "scale", ()),
    }
    for shape in [(3, 7), (5, 6), (2, 4, 5, 8), (3, 1, 1, 7)]:
        tag = "x".join(map(str, shape))
        cases[f"bool_mask_{tag}"] = (q, k, v, {"attn_mask": torch.ones(shape, dtype=torch.bool)}, "attn_mask", ())
        cases[f"float_mask_{tag}"] = (q, k, v, {"attn_mask": torch.zeros(shape)}, "attn_mask", ())
    return cases


BAD = list(_bad_inputs(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", BAD)
def test_attention_rejects_bad_input(name, gen):
    q, k, v, kwargs, pattern, words = _bad_inputs(gen)[name]
    with _raises(pattern, *words):
        fusedattn.attention(q, k, v, **kwargs)


@pytest.mark.parametrize("name", BAD)
def test_sdpa_bad_input_behaves_like_torch(name, gen):
    q, k, v, kwargs, pattern, words = _bad_inputs(gen)[name]
    kwargs = dict(kwargs, enable_gqa=True)
    try:
        expected = TORCH_SDPA(q, k, v, **kwargs)
    except Exception as torch_error:  # torch rejects it: so must the drop-in
        try:
            fusedattn.scaled_dot_product_attention(q, k, v, **kwargs)
        except ValueError as e:
            assert re.search(pattern, str(e), re.IGNORECASE), f"{str(e)!r} does not name {pattern}"
        except type(torch_error):
            pass
        else:
            pytest.fail(f"torch raises {type(torch_error).__name__} ({torch_error}); the drop-in did not")
        return
    try:  # torch accepts it: the drop-in returns torch's answer (or rejects it with a ValueError naming why)
        out = fusedattn.scaled_dot_product_attention(q, k, v, **kwargs)
    except ValueError as e:
        assert re.search(pattern, str(e), re.IGNORECASE), f"{str(e)!r} does not name {pattern}"
        return
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_integer_inputs_message(gen):
    q = randn(2, 4, 5, 8, gen=gen).long()
    with _raises(_NAME["q"]):
        fusedattn.attention(q, q, q)
    with _raises(_NAME["q"]):
        fusedattn.attention(randn(2, 4, 5, 8, gen=gen)[0], q, q)  # rank checked first, q named


@pytest.mark.parametrize("window", [(-2, 0), (0, -3), (-5, -5), (1, 2, 3)])
def test_bad_window(window, gen):
    q, k, v = randn(2, 4, 5, 8, gen=gen), randn(2, 2, 7, 8, gen=gen), randn(2, 2, 7, 8, gen=gen)
    with _raises("window"):
        fusedattn.attention(q, k, v, window=window)


@pytest.mark.parametrize("softcap", [-1.0, -1e-9, math.nan])
def test_bad_softcap(softcap, gen):
    q, k, v = randn(2, 4, 5, 8, gen=gen), randn(2, 2, 7, 8, gen=gen), randn(2, 2, 7, 8, gen=gen)
    with _raises("softcap"):
        fusedattn.attention(q, k, v, softcap=softcap)


# ---------------------------------------------------------------------------------------------- backends


def test_reference_backend_equals_attention_ref(gen):
    q, k, v = randn(2, 4, 13, 16, gen=gen), randn(2, 2, 21, 16, gen=gen), randn(2, 2, 21, 24, gen=gen)
    mask = torch.rand(2, 1, 13, 21, generator=gen) > 0.2
    kw = dict(causal=True, attn_mask=mask, window=(6, -1), softcap=4.0, scale=0.3)
    out, lse = fusedattn.attention(q, k, v, return_lse=True, backend="reference", **kw)
    ref_out, ref_lse = attention_ref(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_backend_on_cpu_is_the_cpu_kernel(gen, dtype):
    q, k, v = (
        randn(2, 4, 13, 16, dtype=dtype, gen=gen),
        randn(2, 2, 21, 16, dtype=dtype, gen=gen),
        randn(2, 2, 21, 16, dtype=dtype, gen=gen),
    )
    auto = fusedattn.attention(q, k, v, causal=True, backend="auto")
    cpu = fusedattn.attention(q, k, v, causal=True, backend="cpu")
    torch.testing.assert_close(auto, cpu, atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only torch")
def test_unavailable_cuda_backend_raises(gen):
    q = randn(1, 2, 5, 8, gen=gen)
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        fusedattn.attention(q, q, q, backend="cuda")


def test_triton_backend_raises_or_works(gen):
    q = randn(1, 2, 5, 8, gen=gen)
    try:
        out = fusedattn.attention(q, q, q, backend="triton")
    except RuntimeError as e:
        assert "triton" in str(e).lower()
    else:
        pytest.skip(f"triton backend available (output {tuple(out.shape)})")


def test_unknown_backend_raises(gen):
    q = randn(1, 2, 5, 8, gen=gen)
    with pytest.raises((ValueError, RuntimeError), match="backend"):
        fusedattn.attention(q, q, q, backend="bogus")


# ---------------------------------------------------------------------------------------------- nn.TransformerEncoder


@pytest.fixture
def no_mha_fastpath():
    """Eval-mode TransformerEncoderLayer may run a fused kernel that never calls SDPA; turn it off."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def _encoder(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def _patch_sdpa(monkeypatch):
    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return fusedattn.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    return calls


@pytest.mark.parametrize("padding", [False, True])
def test_transformer_encoder_eval_with_drop_in(gen, monkeypatch, no_mha_fastpath, padding):
    enc = _encoder(gen).eval()
    x = randn(3, 10, 32, gen=gen)
    pad = None
    if padding:  # True = padding; every sequence keeps at least its first 4 tokens
        pad = torch.zeros(3, 10, dtype=torch.bool)
        pad[0, 7:] = True
        pad[2, 4:] = True
    with torch.no_grad():
        expected = enc(x, src_key_padding_mask=pad)
        calls = _patch_sdpa(monkeypatch)
        got = enc(x, src_key_padding_mask=pad)
    assert len(calls) == 2, f"the drop-in should run once per layer, ran {len(calls)} times"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_transformer_encoder_train_backward_with_drop_in(gen, monkeypatch, no_mha_fastpath):
    enc = _encoder(gen).train()
    x = randn(2, 9, 32, gen=gen)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9)
    expected = enc(x, mask=causal, is_causal=True)
    exp_grads = torch.autograd.grad(expected.square().sum(), list(enc.parameters()))
    calls = _patch_sdpa(monkeypatch)
    got = enc(x, mask=causal, is_causal=True)
    got_grads = torch.autograd.grad(got.square().sum(), list(enc.parameters()))
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, exp_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.fixture
def cuda_loaded(monkeypatch):
    """dispatch's availability table as on a GPU machine with every kernel loaded (the rules need no GPU)."""
    from fusedattn import dispatch

    monkeypatch.setattr(dispatch, "AVAILABILITY", {key: None for key in dispatch.AVAILABILITY})
    return dispatch


def test_cuda_case_rule_names_the_case(cuda_loaded):
    """Which cases the CUDA kernels take (dispatch.unsupported_reason on a CUDA case); api.attention falls back
    from "auto" (with a warning) and raises for backend="cuda" on the others."""

    def why(dtype, head_dim, value_dim, has_mask=False, softcap=0.0):
        case = cuda_loaded.Case("cuda", dtype, head_dim, value_dim, has_mask=has_mask, softcap=softcap)
        return cuda_loaded.unsupported_reason("attention", "cuda", case)

    assert why(torch.bfloat16, 128, 128) is None and why(torch.float16, 64, 64) is None
    assert why(torch.float16, 256, 256, False, 0.0) is None
    assert "float32" in why(torch.float32, 64, 64)
    assert "head dim 80" in why(torch.bfloat16, 80, 80)
    assert "value head dim" in why(torch.bfloat16, 64, 128)
    assert "attn_mask" in why(torch.bfloat16, 64, 64, True)
    assert "softcap" in why(torch.bfloat16, 64, 64, False, 5.0)


# ---------------------------------------------------------------------------------------------- dispatch table
# fusedattn.dispatch resolves every call; these run its rules on described cases (no GPU needed: a Case on
# device "cuda" and a monkeypatched availability table stand for a GPU machine).

FAMILIES = ("attention", "sdpa", "varlen", "decode", "merge")


def _availability(dispatch, missing=(), reason="not installed here"):
    """An availability table where every kernel loaded but those of the backends in `missing`."""
    return {key: (reason if key[1] in missing else None) for key in dispatch.AVAILABILITY}


def test_dispatch_names_and_availability():
    from fusedattn import dispatch

    assert {"cpu", "triton", "cuda", "reference"} <= set(dispatch.BACKENDS)  # a new backend adds itself
    assert fusedattn.BACKENDS == ("auto",) + dispatch.BACKENDS  # what backend= accepts
    assert set(dispatch.available_backends()) == set(dispatch.BACKENDS)
    assert dispatch.available_backends()["reference"] is None
    assert set(dispatch.TABLE) == set(FAMILIES)
    case = dispatch.Case("cpu", torch.float32, 16, 16)
    if dispatch.available_backends()["cpu"] is None:
        assert dispatch.unsupported_reason("attention", "cpu", case) is None
        assert dispatch.resolve("attention", "auto", case).backend == "cpu"
    f64 = dataclasses.replace(case, dtype=torch.float64)
    assert dispatch.unsupported_reason("attention", "reference", f64) is None
    assert "float64" in dispatch.unsupported_reason("attention", "cpu", f64)
    with pytest.raises(ValueError, match="backend"):
        dispatch.resolve("attention", "bogus", case)


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_tensors_prefer_the_cuda_kernel_then_triton(monkeypatch, family):
    """DEVICE_PREFERENCE on CUDA: the CUDA kernel where it covers the case, Triton's for the rest, no warning."""
    from fusedattn import dispatch

    monkeypatch.setattr(dispatch, "AVAILABILITY", _availability(dispatch))
    covered = dispatch.Case("cuda", torch.bfloat16, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = dispatch.resolve(family, "auto", covered).backend
        assert first == ("triton" if family == "varlen" else "cuda")  # no CUDA varlen kernel
        fp32 = dataclasses.replace(covered, dtype=torch.float32)
        assert dispatch.resolve(family, "auto", fp32).backend == ("cuda" if family == "merge" else "triton")
        d80 = dataclasses.replace(covered, head_dim=80, value_dim=80)
        assert dispatch.resolve(family, "auto", d80).backend == ("cuda" if family == "merge" else "triton")


@pytest.mark.parametrize("what", ["fp32", "head_dim", "dv", "mask"])
def test_sdpa_on_cuda_without_triton_falls_back_to_torch(monkeypatch, what):
    """The drop-in with the CUDA kernels loaded and Triton missing: a case the CUDA kernels do not cover goes to
    torch's SDPA with a warning (it used to raise), and the flash-style API to the reference."""
    from fusedattn import dispatch

    monkeypatch.setattr(dispatch, "AVAILABILITY", _availability(dispatch, missing=("triton",)))
    case = dispatch.Case(
        "cuda",
        torch.float32 if what == "fp32" else torch.bfloat16,
        80 if what == "head_dim" else 64,
        128 if what == "dv" else (80 if what == "head_dim" else 64),
        has_mask=what == "mask",
    )
    cuda_reason = dispatch.unsupported_reason("sdpa", "cuda", case)
    assert cuda_reason is not None
    assert cuda_reason == dispatch.unsupported_reason("attention", "cuda", case)
    with pytest.warns(UserWarning, match="falling back to torch.nn.functional.scaled_dot_product_attention") as rec:
        entry = dispatch.resolve("sdpa", "auto", case)
    assert entry.backend == "torch" and entry.op is not None
    assert f"cuda: {cuda_reason}" in str(rec[0].message) and "triton: not installed here" in str(rec[0].message)
    with pytest.warns(UserWarning, match="falling back to the reference"):
        assert dispatch.resolve("attention", "auto", case).backend == "reference"
    # the covered case still takes the CUDA kernel, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("sdpa", "auto", dispatch.Case("cuda", torch.float16, 128, 128)).backend == "cuda"


def test_explicit_backend_raises_with_the_reason(monkeypatch):
    from fusedattn import dispatch

    monkeypatch.setattr(dispatch, "AVAILABILITY", _availability(dispatch, missing=("triton",)))
    fp32 = dispatch.Case("cuda", torch.float32, 64, 64)
    reason = dispatch.unsupported_reason("attention", "cuda", fp32)
    with pytest.raises(RuntimeError, match="does not cover this case: dtype") as err:
        dispatch.resolve("attention", "cuda", fp32)
    assert reason in str(err.value)
    with pytest.raises(RuntimeError, match="'triton' is unavailable: not installed here"):
        dispatch.resolve("decode", "triton", fp32)
    with pytest.raises(RuntimeError, match="no varlen kernel"):
        dispatch.resolve("varlen", "cuda", fp32)
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        dispatch.resolve("attention", "cpu", fp32)
    assert dispatch.resolve("attention", "reference", fp32).backend == "reference"
    meta = dispatch.Case("meta", torch.float32, 64, 64)
    with pytest.warns(UserWarning, match="no fused kernel for device type 'meta'"):
        assert dispatch.resolve("decode", "auto", meta).backend == "reference"


def test_public_modules_compare_no_backend_names():
    """Dispatch is data: the public modules call the resolved entry's op (or its backward), never branch on a name."""
    import inspect

    from fusedattn import api, backward, decode, distributed, varlen

    names = "|".join(("auto",) + fusedattn.dispatch.BACKENDS + ("torch",))
    pattern = re.compile(rf"""(==|!=|\bin|\bis)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=|\bin\b)""")
    for module in (api, decode, varlen, backward, distributed):
        hits = pattern.findall(inspect.getsource(module))
        assert not hits, f"{module.__name__} compares backend names: {hits}"


def test_one_max_splits(gen):
    """One bound on num_splits: the build's (C++) where it exports one, used by the public check and the Triton op."""
    from fusedattn import checks

    assert checks.MAX_SPLITS == fusedattn._ops._BUILD_INFO.get("max_splits", 1024)
    if fusedattn.dispatch.AVAILABILITY[("decode", "triton")] is None:
        from fusedattn.kernels import decode as kd

        assert kd.MAX_SPLITS is checks.MAX_SPLITS
    if fusedattn.available_backends()["cpu"] is not None:
        return
    q, cache, lens = randn(1, 1, 2, 16, gen=gen), randn(1, 8, 2, 16, gen=gen), torch.tensor([3], dtype=torch.int32)
    with torch.no_grad():
        fusedattn.decode_attention(q, cache, cache, cache_seqlens=lens, num_splits=checks.MAX_SPLITS, backend="cpu")
        with pytest.raises(ValueError, match="num_splits"):
            fusedattn.decode_attention(q, cache, cache, cache_seqlens=lens, num_splits=checks.MAX_SPLITS + 1)
        with pytest.raises(RuntimeError, match="num_splits"):  # the C++ op's own bound is the same
            torch.ops.fusedattn.decode_fwd(
                q, cache, cache, lens, None, None, None, None, 0.25, -1, 0, 0.0, checks.MAX_SPLITS + 1
            )


def test_one_window_rule(gen):
    """attention, varlen_attention and decode_attention accept the same windows: each side in [-1, 2**63)."""
    q, k, v = randn(1, 2, 5, 8, gen=gen), randn(1, 2, 7, 8, gen=gen), randn(1, 2, 7, 8, gen=gen)
    cache = randn(1, 8, 2, 8, gen=gen)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    calls = {
        "attention": lambda w: fusedattn.attention(q, k, v, window=w),
        "varlen": lambda w: fusedattn.varlen_attention(
            q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu, 5, 5, window=w
        ),
        "decode": lambda w: fusedattn.decode_attention(
            q[:, :, :1].transpose(1, 2), cache, cache, cache_seqlens=3, window=w
        ),
    }
    for name, call in calls.items():
        unbounded = call((-1, -1))
        torch.testing.assert_close(call((2**63 - 1, 2**63 - 1)), unbounded, atol=0, rtol=0, msg=name)
        for bad in ((2**63, 0), (-2, 0), (0, True)):
            with _raises("window"):
                call(bad)


def test_compile_dynamic_fullgraph(gen):
    """torch.compile(dynamic=True, fullgraph=True) traces the checks and the dispatch of attention,
    varlen_attention and decode_attention, with softcap as a traced float, and the shapes changing."""
    torch._dynamo.reset()

    def dense(q, k, v, softcap):
        return fusedattn.attention(q, k, v, causal=True, softcap=softcap)

    def packed(q, k, v, cu, max_len, softcap):
        return fusedattn.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True, softcap=softcap)

    def cached(q, k_cache, v_cache, lens, softcap):
        return fusedattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, softcap=softcap)

    for fn in (dense, packed, cached):
        compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
        for n, softcap in ((5, 2.5), (9, 3.5)):
            if fn is dense:
                args = (randn(2, 4, n, 16, gen=gen), randn(2, 2, n + 2, 16, gen=gen), randn(2, 2, n + 2, 16, gen=gen))
            elif fn is packed:
                args = (
                    randn(2 * n, 4, 16, gen=gen),
                    randn(2 * n, 2, 16, gen=gen),
                    randn(2 * n, 2, 16, gen=gen),
                    torch.tensor([0, n, 2 * n], dtype=torch.int32),
                    n,
                )
            else:
                args = (
                    randn(2, 1, 4, 16, gen=gen),
                    randn(2, n + 8, 2, 16, gen=gen),
                    randn(2, n + 8, 2, 16, gen=gen),
                    torch.tensor([n, n + 3], dtype=torch.int32),
                )
            with torch.no_grad():
                torch.testing.assert_close(compiled(*args, softcap), fn(*args, softcap), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- torch's contract:
# autocast, tracing, mask ranks, where warnings point


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["none", "float", "bool", "causal"])
@pytest.mark.parametrize("shape", [(2, 4, 13, 16), (8, 13, 16)])
def test_sdpa_under_autocast_runs_in_the_autocast_dtype_like_torch(amp_dtype, mask, shape, gen):
    """torch's SDPA is in autocast's lower_precision_fp list (CPU and CUDA): under torch.autocast float32 inputs
    (and a float mask) are cast to the autocast dtype and the output is in it. The drop-in used to run, and
    return, float32. Values: the 2x rule against float64 of the cast inputs; gradients reach the float32 inputs
    in float32, as torch's."""
    q, k, v = (randn(*shape, gen=gen, requires_grad=True) for _ in range(3))
    kw = {}
    if mask == "float":
        kw["attn_mask"] = randn(shape[-2], shape[-2], gen=gen)
    elif mask == "bool":
        kw["attn_mask"] = torch.rand(shape[-2], shape[-2], generator=gen) > 0.3
        kw["attn_mask"][:, 0] = True
    elif mask == "causal":
        kw["is_causal"] = True
    with torch.autocast("cpu", amp_dtype):
        out = fusedattn.scaled_dot_product_attention(q, k, v, **kw)
        base = TORCH_SDPA(q, k, v, **kw)
    assert base.dtype == amp_dtype and out.dtype == base.dtype
    kw64 = dict(kw)
    if mask == "float":
        kw64["attn_mask"] = kw["attn_mask"].to(amp_dtype).double()
    with sdpa_kernel(SDPBackend.MATH):
        ref = TORCH_SDPA(*(t.detach().to(amp_dtype).double() for t in (q, k, v)), **kw64)
    assert_close_2x(out, ref, base)
    g = randn(*out.shape, gen=gen).to(amp_dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    base_grads = torch.autograd.grad(base, (q, k, v), g)
    assert [t.dtype for t in grads] == [t.dtype for t in base_grads] == [torch.float32] * 3


def test_sdpa_under_autocast_compiles_and_leaves_float64_alone(gen):
    """The autocast policy traces with torch.compile(fullgraph=True), with autocast entered inside the compiled
    function or around it; float64 inputs are not cast (autocast ignores them; the drop-in then hands them to
    torch, which runs them in float64)."""
    torch._dynamo.reset()
    q, k, v = (randn(2, 4, 9, 16, gen=gen) for _ in range(3))

    def inside(q, k, v):
        with torch.autocast("cpu", torch.bfloat16):
            return fusedattn.scaled_dot_product_attention(q, k, v, is_causal=True)

    def plain(q, k, v):
        return fusedattn.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        want = inside(q, k, v)
        assert want.dtype == torch.bfloat16
        torch.testing.assert_close(torch.compile(inside, fullgraph=True, backend="aot_eager")(q, k, v), want)
        compiled = torch.compile(plain, fullgraph=True, backend="aot_eager")
        with torch.autocast("cpu", torch.bfloat16):
            torch.testing.assert_close(compiled(q, k, v), want)
        assert compiled(q, k, v).dtype == torch.float32  # autocast off again: the guard recompiles
        q64 = q.double()
        with torch.autocast("cpu", torch.bfloat16), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the float64 fallback's warning
            out = fusedattn.scaled_dot_product_attention(q64, q64, q64)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, TORCH_SDPA(q64, q64, q64))


def _trace(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and the TracerWarnings of the shape checks
        return torch.jit.trace(fn, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traced_default_scale_follows_the_head_dim(dtype, gen):
    """torch.jit.trace records the default scale 1/sqrt(D) from the traced size, as torch's SDPA does: a drop-in
    (or attention()) traced at D = 8 and run at D = 32 or 24 gives torch's answer there (the scale of D = 8 used
    to be baked into the trace). At the traced head dim the traced output is the untraced one, bit for bit."""

    def drop_in(q, k, v):
        return fusedattn.scaled_dot_product_attention(q, k, v)

    def flash(q, k, v):
        return fusedattn.attention(q, k, v, causal=True)

    def inputs(D):
        return [randn(2, 3, 11, D, gen=gen, dtype=dtype) for _ in range(3)]

    traced, traced_flash = _trace(drop_in, *inputs(8)), _trace(flash, *inputs(8))
    x = inputs(8)
    assert torch.equal(traced(*x), drop_in(*x)) and torch.equal(traced_flash(*x), flash(*x))
    for D in (32, 24):
        x = inputs(D)
        out = traced(*x)
        if dtype == torch.float32:
            torch.testing.assert_close(out, TORCH_SDPA(*x), atol=2e-6, rtol=2e-6)
            torch.testing.assert_close(traced_flash(*x), flash(*x), atol=2e-6, rtol=2e-6)
        else:  # q is scaled by sqrt(8 / D) and rounded to bf16 once (as torch's math SDPA scales q): within 3x
            ref = TORCH_SDPA(*(t.double() for t in x))
            assert_close_2x(out, ref, TORCH_SDPA(*x), factor=3)
            assert_close_2x(traced_flash(*x), attention_ref(*(t.double() for t in x), causal=True), flash(*x), factor=3)


@pytest.mark.parametrize(
    "mask",
    [torch.tensor(True), torch.ones(7, dtype=torch.bool), torch.zeros(7), torch.tensor(0.0), torch.ones(1)],
    ids=["0d_bool", "1d_bool", "1d_float", "0d_float", "1d_float_one"],
)
def test_sdpa_rejects_masks_of_fewer_than_2_dims_like_torch(mask, gen):
    """With 4-D inputs torch's SDPA raises IndexError for a 0-D or 1-D attn_mask (the drop-in used to accept and
    broadcast it): the drop-in raises the same type, naming attn_mask. With 3-D inputs torch takes such a mask,
    and so does the drop-in, with torch's answer."""
    q, k, v = randn(2, 4, 5, 8, gen=gen), randn(2, 4, 7, 8, gen=gen), randn(2, 4, 7, 8, gen=gen)
    with pytest.raises(IndexError):
        TORCH_SDPA(q, k, v, attn_mask=mask)
    with pytest.raises(IndexError, match="attn_mask"):
        fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", torch.bfloat16), pytest.raises(IndexError, match="attn_mask"):
        fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q3, k3, v3 = q[0], k[0], v[0]
    torch.testing.assert_close(
        fusedattn.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask),
        TORCH_SDPA(q3, k3, v3, attn_mask=mask),
        atol=1e-5,
        rtol=1e-5,
    )


def _warning_here(call, line: int) -> None:
    """`call()` warns once (a fallback), and the warning points at `line` of this file: the user's call line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    fallbacks = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert (fallbacks[0].filename, fallbacks[0].lineno) == (__file__, line), str(fallbacks[0].message)


def test_fallback_warnings_point_at_the_callers_line(gen):
    """Every public function's fallback warning names the line that called it (stacklevel counts the frames
    between warnings.warn and the user: one too many pointed at the caller's caller)."""
    import inspect

    q, k, v = (randn(1, 2, 5, 8, gen=gen, dtype=torch.float64) for _ in range(3))
    qf = q.float()
    here = inspect.currentframe()
    _warning_here(lambda: fusedattn.scaled_dot_product_attention(q, k, v), here.f_lineno)
    _warning_here(lambda: fusedattn.scaled_dot_product_attention(qf, qf, qf, dropout_p=0.5), here.f_lineno)
    _warning_here(lambda: fusedattn.attention(q, k, v, causal=True), here.f_lineno)
    cache, lens = randn(1, 6, 2, 8, gen=gen, dtype=torch.float64), torch.tensor([4], dtype=torch.int32)
    qd = q[:, :, :1].transpose(1, 2)  # (1, 1, 2, 8)
    _warning_here(lambda: fusedattn.decode_attention(qd, cache, cache, cache_seqlens=lens), here.f_lineno)
    packed, cu = q[0].transpose(0, 1), torch.tensor([0, 5], dtype=torch.int32)  # (5, 2, 8)
    _warning_here(lambda: fusedattn.varlen_attention(packed, packed, packed, cu, cu, 5, 5), here.f_lineno)
    out, lse = q.transpose(1, 2)[:, :1], torch.zeros(1, 2, 1)  # (B, L, H, D) float64, lse float32
    _warning_here(lambda: fusedattn.merge_attention_states(out, lse, out, lse), here.f_lineno)
    with pytest.warns(UserWarning, match="falling back") as record:
        fusedattn.scaled_dot_product_attention(q, k, v)
    assert record[0].filename == __file__ and record[0].lineno == here.f_lineno - 1


@pytest.mark.parametrize("family", ["attention", "varlen"])
def test_backward_table_entries_share_one_signature(family, gen):
    """dispatch.backward_op: every backend's backward takes the family's one signature (mask and grad_lse
    included), so callers that run a backward on their own (backward.py's ops, the ring) never branch on names."""
    from fusedattn import dispatch

    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 9, 13, 16
    names = [b for b in dispatch.BACKENDS if b in ("cpu", "reference") and dispatch.AVAILABILITY[(family, b)] is None]
    if len(names) < 2:
        pytest.skip("needs the CPU kernels")
    with pytest.raises(RuntimeError, match="no varlen backward"):
        dispatch.backward_op("varlen", "cuda")
    with pytest.raises(ValueError, match="differentiable"):
        dispatch.backward_op("decode", "cpu")
    if family == "attention":
        q, k, v = randn(B, Hq, Lq, D, gen=gen), randn(B, Hkv, Lk, D, gen=gen), randn(B, Hkv, Lk, D, gen=gen)
        mask = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3
        out, lse = attention_ref(q, k, v, attn_mask=mask, return_lse=True)
        dout, glse = randn(*out.shape, gen=gen), randn(*lse.shape, gen=gen)
        args = (dout, q, k, v, out, lse, mask, D**-0.5, -1, 0, True, 0.0, glse)
    else:
        cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 13], dtype=torch.int32)
        q, k, v = randn(9, Hq, D, gen=gen), randn(13, Hkv, D, gen=gen), randn(13, Hkv, D, gen=gen)
        out, lse = fusedattn.varlen_attention(q, k, v, cu_q, cu_k, 5, 7, causal=True, return_lse=True)
        dout, glse = randn(*out.shape, gen=gen), randn(*lse.shape, gen=gen)
        args = (dout, q, k, v, out, lse, cu_q, cu_k, 5, 7, D**-0.5, -1, 0, True, 0.0, glse)
    got = {name: dispatch.backward_op(family, name)(*args) for name in names}
    for a, b in zip(got["cpu"], got["reference"]):
        assert (a.float() - b.float()).abs().max() < 1e-4
    no_glse = dispatch.backward_op(family, "reference")(*args[:-1], None)
    assert (no_glse[0] - got["reference"][0]).abs().max() > 1e-3  # grad_lse reaches the reference too
