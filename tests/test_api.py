"""Public API: the drop-in scaled_dot_product_attention against torch's, fallbacks, input validation, backend
selection, op registration, and a stock nn.TransformerEncoder running on the drop-in."""

from __future__ import annotations

import contextlib
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
        q, k, v = (randn(B * H, Lq, 16, dtype=dt, gen=gen), randn(B * H, Lk, 16, dtype=dt, gen=gen),
                   randn(B * H, Lk, 24, dtype=dt, gen=gen))
        keypad_shape, full_shape = (B * H, 1, Lk), (B * H, Lq, Lk)
    else:
        q, k, v = (randn(B, H, Lq, 16, dtype=dt, gen=gen), randn(B, Hkv, Lk, 16, dtype=dt, gen=gen),
                   randn(B, Hkv, Lk, 24, dtype=dt, gen=gen))
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


SDPA_GRID = pairwise({
    "shape": ["3d", "4d", "4d_gqa"],
    "mask": ["none", "causal", "bool_2d", "bool_keypad", "float_2d", "float_full"],
    "lens": [(1, 1), (13, 13), (7, 29), (29, 7), (64, 64)],
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    "scale": [None, 0.2],
})


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
    for fn, dtype in ((fusedattn.scaled_dot_product_attention, q.dtype), (TORCH_SDPA, torch.float64),
                      (TORCH_SDPA, q.dtype)):
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
    q, k, v = (randn(2, 4, 13, 16, dtype=dtype, gen=gen), randn(2, 2, 21, 16, dtype=dtype, gen=gen),
               randn(2, 2, 21, 16, dtype=dtype, gen=gen))
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
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True)
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


def test_cuda_case_rule_names_the_case():
    """Which cases the CUDA kernels take (fusedattn.dispatch.cuda_unsupported_reason); api.attention falls back
    from "auto" (with a warning) and raises for backend="cuda" on the others."""
    from fusedattn.dispatch import cuda_unsupported_reason as why
    assert why(torch.bfloat16, 128, 128) is None and why(torch.float16, 64, 64) is None
    assert why(torch.float16, 256, 256, False, 0.0) is None
    assert "float32" in why(torch.float32, 64, 64)
    assert "head dim 80" in why(torch.bfloat16, 80, 80)
    assert "value head dim" in why(torch.bfloat16, 64, 128)
    assert "attn_mask" in why(torch.bfloat16, 64, 64, True)
    assert "softcap" in why(torch.bfloat16, 64, 64, False, 5.0)
