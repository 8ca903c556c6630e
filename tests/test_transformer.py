"""Model blocks (fusedattn.transformer.model, .seq2seq, .generate): every block against the same block with
backend="torch".

The 2x rule per block: ref = the block copied to float64 running torch's sdpa; base = the block in the test dtype
running torch's sdpa; out = the block in the test dtype running our kernels. Then GPT generation (cached ==
uncached, contiguous == paged, padding on either side == each prompt alone), and the encoder-decoder learning a
toy copy task. transformers is not needed here (tests/test_hf.py covers the Hugging Face side).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import assert_close_2x, case_id, pairwise, randn
from fusedattn.transformer import kv_cache
from fusedattn.transformer.model import (
    GPT,
    Block,
    FeedForward,
    GPTConfig,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositions,
    attend,
    linear,
    set_attention_backend,
)
from fusedattn.transformer.seq2seq import Transformer, TransformerConfig

BACKEND = "cpu"


def _three_runs(module: torch.nn.Module, dtype: torch.dtype, run):
    """(out, ref, base) of `run(module_copy, cast)` for our backend in dtype, torch float64, torch in dtype."""
    ours = set_attention_backend(copy.deepcopy(module), BACKEND).to(dtype)
    ref = set_attention_backend(copy.deepcopy(module), "torch").double()
    base = set_attention_backend(copy.deepcopy(module), "torch").to(dtype)
    with torch.no_grad():
        return (
            run(ours, lambda t: t.to(dtype)),
            run(ref, lambda t: t.double()).float(),
            run(base, lambda t: t.to(dtype)),
        )


def _padding_mask(B: int, L: int, gen, left: bool = False) -> torch.Tensor:
    """(B, L) bool, True on each row's real tokens: row 0 full, the others random lengths >= 1."""
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    lengths[0] = L
    ar = torch.arange(L)
    return ar >= (L - lengths)[:, None] if left else ar < lengths[:, None]


# ------------------------------------------------------------------------------------------------
# attention core and MultiHeadAttention
# ------------------------------------------------------------------------------------------------
ATTEND_CASES = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16],
        "lens": [(1, 1), (17, 17), (5, 97), (97, 33)],
        "heads": [(4, 4), (4, 2), (4, 1)],
        "causal": [False, True],
        "padded": [False, True],
        "D": [32, 64],
    }
)


@pytest.mark.parametrize("case", ATTEND_CASES, ids=case_id)
def test_attend_matches_torch(case, gen):
    (Lq, Lk), (H, Hkv), D, dtype = case["lens"], case["heads"], case["D"], case["dtype"]
    B = 3
    q, k, v = randn(B, H, Lq, D, gen=gen), randn(B, Hkv, Lk, D, gen=gen), randn(B, Hkv, Lk, D, gen=gen)
    mask = _padding_mask(B, Lk, gen) if case["padded"] else None
    kw = dict(causal=case["causal"], key_padding_mask=mask)
    out = attend(q.to(dtype), k.to(dtype), v.to(dtype), backend=BACKEND, **kw)
    ref = attend(q.double(), k.double(), v.double(), backend="torch", **kw).float()
    base = attend(q.to(dtype), k.to(dtype), v.to(dtype), backend="torch", **kw)
    assert not out.isnan().any()
    assert_close_2x(out, ref, base)


MHA_CASES = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16],
        "kind": ["self", "cross"],
        "heads": [(4, 4), (4, 2), (4, 1)],
        "T": [1, 17, 33],
        "causal": [False, True],
        "padded": [False, True],
        "rotary": [False, True],
    }
)


@pytest.mark.parametrize("case", MHA_CASES, ids=case_id)
def test_multihead_attention_matches_torch(case, gen):
    (H, Hkv), T, dtype = case["heads"], case["T"], case["dtype"]
    B, C, S = 3, 64, 13
    cross = case["kind"] == "cross"
    rotary = RotaryEmbedding(C // H, 64) if case["rotary"] and not cross else None
    mha = MultiHeadAttention(C, H, Hkv, cross=cross, rotary=rotary)
    x, ctx = randn(B, T, C, gen=gen), randn(B, S, C, gen=gen)
    mask = _padding_mask(B, S if cross else T, gen, left=True) if case["padded"] else None
    positions = torch.arange(T).expand(B, T)
    out, ref, base = _three_runs(
        mha,
        dtype,
        lambda m, c: m(
            c(x),
            c(ctx) if cross else None,
            causal=case["causal"] and not cross,
            key_padding_mask=mask,
            positions=positions,
        ),
    )
    assert out.shape == (B, T, C)
    assert_close_2x(out, ref, base)


def test_multihead_attention_fused_projection_layout(gen):
    """The fused qkv projection is [q | k | v] with heads contiguous: check against an explicit computation."""
    B, T, C, H, Hkv = 2, 7, 32, 4, 2
    D = C // H
    mha = MultiHeadAttention(C, H, Hkv)
    x = randn(B, T, C, gen=gen)
    w, b = mha.qkv_proj.weight, mha.qkv_proj.bias
    q = (x @ w[: H * D].T + b[: H * D]).view(B, T, H, D).transpose(1, 2)
    k = (x @ w[H * D : (H + Hkv) * D].T + b[H * D : (H + Hkv) * D]).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ w[(H + Hkv) * D :].T + b[(H + Hkv) * D :]).view(B, T, Hkv, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    att = (
        ((q @ k.transpose(-1, -2)) / math.sqrt(D))
        .masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        .softmax(-1)
    )
    expect = mha.out_proj((att @ v).transpose(1, 2).reshape(B, T, C))
    with torch.no_grad():
        torch.testing.assert_close(mha(x, causal=True), expect, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# FFN, positions, blocks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "swiglu"])
def test_feed_forward(activation, gen):
    ffn = FeedForward(48, activation=activation)
    x = randn(2, 5, 48, gen=gen)
    h = ffn.fc(x)
    F = torch.nn.functional
    act = {
        "gelu": lambda: F.gelu(h),
        "gelu_tanh": lambda: F.gelu(h, approximate="tanh"),
        "relu": h.relu,
        "swiglu": lambda: F.silu(ffn.gate(x)) * h,
    }[activation]
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), ffn.proj(act()))
    assert ffn.fc.out_features == (4 * 48 if activation != "swiglu" else 128)


def test_linear_stores_widening_weights_transposed(gen):
    """linear(): an nn.Linear in every respect (shapes, state dict, outputs, gradients), with a widening layer's
    weight laid out (in, out) in memory -- a layout .to(), load_state_dict and deepcopy keep."""
    wide, narrow = linear(16, 40), linear(40, 16)
    assert wide.weight.shape == (40, 16) and wide.weight.stride() == (1, 40)
    assert narrow.weight.is_contiguous()
    ref = torch.nn.Linear(16, 40)
    wide.load_state_dict(ref.state_dict())
    assert wide.weight.stride() == (1, 40)
    assert copy.deepcopy(wide).to(torch.float64).weight.stride() == (1, 40)
    x = randn(3, 16, gen=gen, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(wide(x), ref(x2), rtol=1e-6, atol=1e-6)
    wide(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(wide.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_sinusoidal_positions_formula():
    pe = SinusoidalPositions(50, 16)
    p, i = 37, 3
    assert math.isclose(pe.pe[p, 2 * i].item(), math.sin(p / 10000 ** (2 * i / 16)), abs_tol=1e-5)
    assert math.isclose(pe.pe[p, 2 * i + 1].item(), math.cos(p / 10000 ** (2 * i / 16)), abs_tol=1e-5)


def test_rotary_scores_depend_on_offset_only(gen):
    """RoPE: <R(p) q, R(p') k> depends on p - p' only, and R(0) is the identity."""
    rope = RotaryEmbedding(16, 128)
    q, k = randn(1, 1, 1, 16, gen=gen), randn(1, 1, 1, 16, gen=gen)
    pos = lambda p: torch.tensor([[p]])  # noqa: E731
    s1 = (rope(q, pos(10)) * rope(k, pos(3))).sum()
    s2 = (rope(q, pos(90)) * rope(k, pos(83))).sum()
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rope(q, pos(0)), q)


BLOCK_CASES = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16],
        "prenorm": [True, False],
        "norm": ["layernorm", "rmsnorm"],
        "ffn": ["gelu", "relu", "swiglu"],
        "cross": [False, True],
        "heads": [(4, 4), (4, 1)],
    }
)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=case_id)
def test_block_matches_torch(case, gen):
    B, T, S, C = 2, 17, 9, 64
    H, Hkv = case["heads"]
    block = Block(C, H, Hkv, cross=case["cross"], ffn=case["ffn"], norm=case["norm"], prenorm=case["prenorm"])
    x, mem = randn(B, T, C, gen=gen), randn(B, S, C, gen=gen)
    tgt_mask, mem_mask = _padding_mask(B, T, gen), _padding_mask(B, S, gen)

    def run(m, c):
        return m(
            c(x),
            causal=True,
            key_padding_mask=tgt_mask,
            memory=c(mem) if case["cross"] else None,
            memory_mask=mem_mask,
        )

    out, ref, base = _three_runs(block, case["dtype"], run)
    assert_close_2x(out, ref, base)


# ------------------------------------------------------------------------------------------------
# Encoder, Decoder, encoder-decoder, GPT forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pos,prenorm,dtype",
    [("sinusoidal", False, torch.float32), ("learned", True, torch.float32), ("rotary", True, torch.bfloat16)],
)
def test_encoder_decoder_matches_torch(pos, prenorm, dtype, gen):
    cfg = TransformerConfig(
        src_vocab_size=50, tgt_vocab_size=40, max_len=64, d_model=64, n_head=4, n_kv_head=2, pos=pos, prenorm=prenorm
    )
    model = Transformer(cfg).eval()
    src, tgt = torch.randint(0, 50, (3, 19), generator=gen), torch.randint(0, 40, (3, 11), generator=gen)
    src_mask, tgt_mask = _padding_mask(3, 19, gen), _padding_mask(3, 11, gen)
    out, ref, base = _three_runs(model, dtype, lambda m, c: m(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask))
    assert out.shape == (3, 11, 40)
    assert_close_2x(out, ref, base)


def _tiny_gpt(**kw) -> GPT:
    cfg = dict(vocab_size=97, block_size=96, n_layer=2, n_head=4, n_embd=64)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg)).eval()


GPT_VARIANTS = {
    "gpt2": {},
    "llama": dict(n_kv_head=2, ffn="swiglu", norm="rmsnorm", pos="rotary", bias=False, tie_weights=False),
    "mqa_sinusoidal_postln": dict(n_kv_head=1, pos="sinusoidal", prenorm=False, ffn="relu"),
}


@pytest.mark.parametrize("variant", list(GPT_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_forward_matches_torch(variant, dtype, gen):
    model = _tiny_gpt(**GPT_VARIANTS[variant])
    idx = torch.randint(0, 97, (3, 29), generator=gen)
    mask = _padding_mask(3, 29, gen, left=True)
    out, ref, base = _three_runs(model, dtype, lambda m, c: m(idx, attention_mask=mask))
    keep = mask[..., None].expand_as(out)  # padded query rows are garbage on every backend
    assert_close_2x(out[keep], ref[keep], base[keep])


def test_gpt_loss_and_backward_match_torch(gen):
    """Training path: the loss and every parameter gradient, ours vs torch (3x rule for gradients)."""
    model = _tiny_gpt(**GPT_VARIANTS["llama"]).train()
    idx = torch.randint(0, 97, (2, 23), generator=gen)
    results = {}
    for name, backend, dtype in (
        ("out", BACKEND, torch.float32),
        ("ref", "torch", torch.float64),
        ("base", "torch", torch.float32),
    ):
        m = set_attention_backend(copy.deepcopy(model), backend).to(dtype)
        _, loss = m(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    assert_close_2x(results["out"][0], results["ref"][0].float(), results["base"][0], name="loss")
    for n in results["out"][1]:
        assert_close_2x(
            results["out"][1][n], results["ref"][1][n].float(), results["base"][1][n], factor=3, name=f"grad {n}"
        )


def test_block_compiles_fullgraph(gen):
    block = Block(32, 4, 2, ffn="swiglu", norm="rmsnorm").eval()
    x, mask = randn(2, 9, 32, gen=gen), _padding_mask(2, 9, gen)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x, causal=True, key_padding_mask=mask), block(x, causal=True, key_padding_mask=mask)
        )


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(GPT_VARIANTS))
def test_generate_cached_equals_uncached(variant, gen):
    model = _tiny_gpt(**GPT_VARIANTS[variant])
    idx = torch.randint(0, 97, (3, 11), generator=gen)
    uncached = model.generate(idx, 20, temperature=0, use_cache=False)
    assert uncached.shape == (3, 31) and torch.equal(uncached[:, :11], idx)
    assert torch.equal(model.generate(idx, 20, temperature=0), uncached)
    assert torch.equal(model.generate(idx, 20, temperature=0, paged=True, page_size=4), uncached)


def test_generate_sampling_cached_equals_uncached(gen):
    """Same generator seed: top-k + top-p sampling draws the same tokens with and without the cache."""
    model = _tiny_gpt(**GPT_VARIANTS["llama"])
    idx = torch.randint(0, 97, (2, 5), generator=gen)
    outs = [
        model.generate(
            idx, 15, temperature=0.8, top_k=20, top_p=0.9, use_cache=c, generator=torch.Generator().manual_seed(7)
        )
        for c in (True, False)
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("paged", [False, True])
def test_generate_batched_padding_equals_each_prompt_alone(side, paged, gen):
    model = _tiny_gpt(**GPT_VARIANTS["llama"])
    B, T, N = 4, 13, 12
    idx = torch.randint(0, 97, (B, T), generator=gen)
    mask = _padding_mask(B, T, gen, left=side == "left")
    idx = idx.masked_fill(~mask, 0)
    out = model.generate(idx, N, temperature=0, attention_mask=mask, paged=paged, page_size=4, pad_token_id=0)
    assert torch.equal(out, model.generate(idx, N, temperature=0, attention_mask=mask, use_cache=False, pad_token_id=0))
    for b in range(B):
        L = int(mask[b].sum())
        alone = model.generate(idx[b : b + 1][mask[b : b + 1]].view(1, L), N, temperature=0)[0]  # (L + N,)
        row = out[b]
        if side == "left":
            assert torch.equal(row[T - L :], alone)
        else:
            assert torch.equal(row[: L + N], alone) and bool((row[L + N :] == 0).all())


@pytest.mark.parametrize(
    "backend, expected", [("reference", "reference"), ("cpu", "cpu"), ("auto", "auto"), ("torch", "reference")]
)
def test_cached_decode_uses_the_requested_backend(backend, expected, gen, monkeypatch):
    """The KV-cache path hands decode_attention the model's backend (it used to turn "cpu" etc. into "auto");
    "torch" (sdpa has no cached decode) runs the reference."""
    seen = []
    real = kv_cache.decode_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kv_cache, "decode_attention", spy)
    model = _tiny_gpt(**GPT_VARIANTS["llama"])
    set_attention_backend(model, backend)
    idx = torch.randint(0, 97, (2, 5), generator=gen)
    out = model.generate(idx, 3, temperature=0)
    assert seen and set(seen) == {expected}
    assert torch.equal(out, model.generate(idx, 3, temperature=0, use_cache=False))


def test_generate_stops_at_eos(gen):
    model = _tiny_gpt()
    idx = torch.randint(0, 97, (2, 6), generator=gen)
    free = model.generate(idx, 10, temperature=0)
    eos = int(free[0, 8])  # row 0's third new token
    out = model.generate(idx, 10, temperature=0, eos=eos, pad_token_id=-1)
    first = (free[0, 6:] == eos).nonzero()[0].item()
    assert torch.equal(out[0, : 6 + first + 1], free[0, : 6 + first + 1])
    assert bool((out[0, 6 + first + 1 :] == -1).all())


def test_generate_bad_inputs():
    model = _tiny_gpt()
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous"):
        model.generate(idx, 2, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one real token"):
        model.generate(idx, 2, attention_mask=torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(idx, 200)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(idx, 2, top_p=0.0)
    with pytest.raises(ValueError, match="backend"):
        MultiHeadAttention(32, 4, backend="flash")
    with pytest.raises(ValueError, match="n_kv_head"):
        MultiHeadAttention(32, 4, 3)
    with pytest.raises(ValueError, match="caches"):
        model(idx, caches=model.make_caches(2, 8)[:1])


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_restores_each_modules_mode(use_cache, gen):
    """generate() runs in eval mode (dropout off: the tokens are those of the model in eval mode) and leaves every
    module in the mode the caller had it in (it used to leave the whole model in eval mode)."""
    model = _tiny_gpt(dropout=0.5)
    idx = torch.randint(0, 97, (2, 6), generator=gen)
    want = model.generate(idx, 5, temperature=0, use_cache=use_cache)
    model.train()
    model.blocks[1].eval()  # a mixed state (e.g. a frozen block) must come back as it was, not as train()
    before = {name: m.training for name, m in model.named_modules()}
    got = model.generate(idx, 5, temperature=0, use_cache=use_cache)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="block_size"):  # a failing call restores the modes too
        model.generate(idx, 500)
    assert {name: m.training for name, m in model.named_modules()} == before


@pytest.mark.parametrize("kw", [{}, {"use_cache": False}, {"paged": True, "page_size": 4}])
def test_generate_empty_batch_gives_an_empty_result(kw):
    """No prompts: an empty (0, T + max_new_tokens) result, as torch maps an empty batch to an empty batch (it
    used to fail inside a min() over the empty batch); the arguments are still checked."""
    model = _tiny_gpt()
    idx = torch.zeros(0, 5, dtype=torch.long)
    out = model.generate(idx, 3, **kw)
    assert out.shape == (0, 8) and out.dtype == idx.dtype
    out = model.generate(idx, 3, attention_mask=torch.zeros(0, 5, dtype=torch.long), **kw)
    assert out.shape == (0, 8)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(idx, 200, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, -1, **kw)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(idx, 3, attention_mask=torch.ones(1, 5), **kw)


# ------------------------------------------------------------------------------------------------
# KV caches: bookkeeping of the paged cache, argument checks of both
# ------------------------------------------------------------------------------------------------
def _paged_state(cache: kv_cache.PagedKVCache):
    return (
        list(cache.free_pages),
        [list(p) for p in cache.pages],
        cache.block_table.clone(),
        cache.seqlens.clone(),
        cache.k.clone(),
        cache.v.clone(),
    )


def _assert_same_state(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    for x, y in zip(a[2:], b[2:]):
        assert torch.equal(x, y)


def test_paged_cache_batch_append_out_of_pages_is_atomic(gen):
    """A batch whose appends need more pages than are free raises and changes nothing: no sequence of the batch
    keeps pages (the first sequences used to keep theirs while a later one ran out), through append, update and
    attend; the same batch fits once pages are freed."""
    cache = kv_cache.PagedKVCache(num_pages=6, page_size=4, max_batch=3, max_seq_len=16, num_kv_heads=1, head_dim=8)
    k0 = randn(1, 5, 1, 8, gen=gen)
    cache.append(k0, k0, seq_ids=[0])  # 2 pages; 4 free
    k = randn(2, 9, 1, 8, gen=gen)  # 3 pages each: 6 needed
    before = _paged_state(cache)
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.append(k, k, seq_ids=[1, 2])
    _assert_same_state(_paged_state(cache), before)
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.update(0, k, k, seq_ids=[2, 1])
    _assert_same_state(_paged_state(cache), before)
    q = randn(2, 1, 2, 8, gen=gen)
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.attend(q, k[:, :1].expand(2, 9, 1, 8), k[:, :1].expand(2, 9, 1, 8), seq_ids=[1, 2])
    _assert_same_state(_paged_state(cache), before)
    assert cache.num_free_pages == 4 and [len(p) for p in cache.pages] == [2, 0, 0]
    cache.free([0])
    cache.append(k, k, seq_ids=[1, 2])
    assert cache.num_free_pages == 0 and cache.seqlens.tolist() == [0, 9, 9]


def test_paged_cache_failed_append_holds_no_pages(gen):
    """A call that fails after its pages were found (a k_new of the wrong head count, a bad decode argument)
    gives them back: the cache is as before the call."""
    cache = kv_cache.PagedKVCache(num_pages=8, page_size=4, max_batch=2, max_seq_len=16, num_kv_heads=1, head_dim=8)
    k0 = randn(2, 3, 1, 8, gen=gen)
    cache.append(k0, k0)
    before = _paged_state(cache)
    bad = randn(2, 6, 3, 8, gen=gen)  # 3 kv heads for a 1-head cache
    with pytest.raises(RuntimeError):
        cache.update(3, bad, bad)
    _assert_same_state(_paged_state(cache), before)
    k = randn(2, 6, 1, 8, gen=gen)
    with pytest.raises((ValueError, RuntimeError)):
        cache.attend(randn(2, 1, 2, 8, gen=gen), k, k, window=(-5, 0))  # rejected by decode_attention
    _assert_same_state(_paged_state(cache), before)


def test_paged_cache_rejects_sequences_past_max_seq_len(gen):
    """max_seq_len = 10 with pages of 4: the block table has room for 12 tokens, but a sequence may hold 10
    (11 used to be accepted)."""
    cache = kv_cache.PagedKVCache(num_pages=6, page_size=4, max_batch=2, max_seq_len=10, num_kv_heads=1, head_dim=8)
    k = randn(1, 11, 1, 8, gen=gen)
    before = _paged_state(cache)
    with pytest.raises(RuntimeError, match="max_seq_len"):
        cache.append(k, k, seq_ids=[1])
    _assert_same_state(_paged_state(cache), before)
    cache.append(k[:, :10], k[:, :10], seq_ids=[1])
    with pytest.raises(RuntimeError, match="max_seq_len"):
        cache.attend(randn(1, 1, 2, 8, gen=gen), k[:, :1], k[:, :1], seq_ids=[1])
    with pytest.raises(RuntimeError, match="max_seq_len"):
        cache.update(7, k[:, :4], k[:, :4], seq_ids=[0])
    assert cache.seqlens.tolist() == [0, 10] and cache.num_free_pages == 3
    contiguous = kv_cache.KVCache(max_batch=2, max_seq_len=10, num_kv_heads=1, head_dim=8)
    with pytest.raises(RuntimeError, match="max_seq_len"):
        contiguous.append(k, k, seq_ids=[1])


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize(
    "seq_ids", [[0.0, 1.7], [1.0], torch.tensor([1.0]), torch.tensor([0.5, 1.0], dtype=torch.float64), [True], 1.9]
)
def test_cache_rejects_non_integer_seq_ids(paged, seq_ids, gen):
    """Float (or bool) seq_ids are refused, not truncated (1.7 used to address slot 1); so is a float pos."""
    if paged:
        cache = kv_cache.PagedKVCache(num_pages=8, page_size=4, max_batch=3, max_seq_len=8, num_kv_heads=1, head_dim=8)
    else:
        cache = kv_cache.KVCache(max_batch=3, max_seq_len=8, num_kv_heads=1, head_dim=8)
    n = torch.as_tensor(seq_ids).numel()
    k = randn(n, 2, 1, 8, gen=gen)
    with pytest.raises(ValueError, match="seq_ids"):
        cache.append(k, k, seq_ids=seq_ids)
    with pytest.raises(ValueError, match="seq_ids"):
        cache.attend(randn(n, 1, 2, 8, gen=gen), k, k, seq_ids=seq_ids)
    with pytest.raises(ValueError, match="seq_ids"):
        cache.reset(seq_ids)
    with pytest.raises(ValueError, match="pos"):
        cache.update(1.5, k, k, seq_ids=list(range(n)))
    assert cache.seqlens.tolist() == [0, 0, 0]
    cache.append(k, k, seq_ids=torch.arange(n, dtype=torch.int32))  # integer ids of any integer dtype
    assert cache.seqlens.tolist()[:n] == [2] * n


# ------------------------------------------------------------------------------------------------
# training: the encoder-decoder learns to copy
# ------------------------------------------------------------------------------------------------
def test_encoder_decoder_learns_copy_task():
    torch.manual_seed(0)
    V, BOS, L = 12, 1, 8  # tokens 2..11 are data
    cfg = TransformerConfig(
        src_vocab_size=V,
        tgt_vocab_size=V,
        max_len=16,
        d_model=64,
        n_head=4,
        n_kv_head=2,
        n_encoder_layers=2,
        n_decoder_layers=2,
        prenorm=True,
        backend=BACKEND,
    )
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        src = torch.randint(2, V, (32, L))
        tgt_in = torch.cat([torch.full((32, 1), BOS), src[:, :-1]], dim=1)
        _, loss = model(src, tgt_in, targets=src)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"
    src = torch.randint(2, V, (16, L))
    copied = model.eval().greedy_decode(src, BOS, L)[:, 1:]
    assert (copied == src).float().mean() > 0.5


def test_example_generate_script(tmp_path, capsys):
    """transformer/examples/generate.py loads a saved state dict and generates (greedy: reproducible)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "transformer" / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    dims = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64"]
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=32))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    example.main(
        dims + ["--weights", str(tmp_path / "w.pt"), "--prompt", "hi", "--max-new-tokens", "6", "--temperature", "0"]
    )
    out = capsys.readouterr().out
    expect = model.generate(torch.tensor([list(b"hi")]), 6, temperature=0)[0].tolist()
    assert repr(bytes(expect).decode(errors="replace")) in out and "tokens/s" in out
