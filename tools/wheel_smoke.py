"""Smoke test of an installed fusedattn (a wheel in a fresh venv), run from outside the source tree.

Every public op once on small inputs, checked against the reference or torch: it proves the wheel holds a
working binary for this torch, not the kernels' accuracy (the test suite does that). Exits non-zero on failure.

    python tools/wheel_smoke.py [--source-tree DIR]    # DIR: refuse to test a fusedattn imported from there
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-tree", help="the repository checkout; fusedattn must not be imported from it")
    args = ap.parse_args()

    import fusedattn
    from fusedattn import _ops

    where = os.path.realpath(fusedattn.__file__)
    print(f"fusedattn imported from {where}")
    if args.source_tree and where.startswith(os.path.realpath(args.source_tree) + os.sep):
        sys.exit("wheel_smoke: fusedattn was imported from the source tree, not from the installed wheel")
    if _ops._C is None:
        sys.exit(f"wheel_smoke: the compiled extension did not load: {_ops._C_IMPORT_ERROR}")
    bi = _ops.build_info()
    assert bi["torch_version"].split("+")[0] == torch.__version__.split("+")[0], (bi, torch.__version__)
    assert fusedattn.available_backends()["cpu"] is None, fusedattn.available_backends()
    from fusedattn._build_torch import TORCH_VERSION

    print(f"built for torch {TORCH_VERSION}, running torch {torch.__version__}, CPU kernel {bi['cpu_isa_selected']}")

    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def close(a, b, tol):
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert err <= tol, f"max abs err {err:.3e} > {tol:g}"
        return err

    checks = 0
    # fusedattn.attention: forward (GQA, causal, mask, window, softcap, lse) and backward, fp32 and bf16
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q = randn(2, 4, 37, 64, dtype=dtype).requires_grad_()
        k = randn(2, 2, 45, 64, dtype=dtype).requires_grad_()
        v = randn(2, 2, 45, 48, dtype=dtype).requires_grad_()
        mask = torch.rand(2, 1, 37, 45, generator=g) > 0.2
        kw = dict(causal=True, attn_mask=mask, window=(20, 0), softcap=10.0, scale=0.2)
        out, lse = fusedattn.attention(q, k, v, return_lse=True, backend="cpu", **kw)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, ref_lse = fusedattn.attention_ref(q64, k64, v64, return_lse=True, compute_dtype=torch.float64, **kw)
        close(out, ref, tol)
        close(lse, ref_lse, 1e-3)
        gout = randn(*out.shape)
        grads = torch.autograd.grad(out, (q, k, v), gout.to(dtype))
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), gout.double())
        for a, b in zip(grads, ref_grads):
            close(a, b, 10 * tol)
    checks += 1
    print("fusedattn.attention fwd+bwd (fp32, bf16): ok")

    # the drop-in, against torch's own function
    q, k, v = randn(2, 4, 33, 32), randn(2, 4, 33, 32), randn(2, 4, 33, 32)
    mask = torch.randn(33, 33, generator=g)
    for kw in (dict(is_causal=True), dict(attn_mask=mask), dict(scale=0.3)):
        close(
            fusedattn.scaled_dot_product_attention(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw), 1e-5
        )
    close(
        fusedattn.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
        F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
        1e-5,
    )
    checks += 1
    print("fusedattn.scaled_dot_product_attention: ok")

    # the reference (plain PyTorch) on its own
    out = fusedattn.attention_ref(q, k, v, causal=True, causal_align="top_left")
    close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), 1e-5)
    checks += 1
    print("fusedattn.attention_ref: ok")

    # the raw op and torch.compile see the fake impl and autograd registrations
    out, lse = torch.ops.fusedattn.attention_fwd(q, k, v, None, 0.25, -1, 0, True, 0.0)
    close(out, fusedattn.attention_ref(q, k, v, causal=True, scale=0.25), 1e-5)
    compiled = torch.compile(
        lambda a, b, c: fusedattn.attention(a, b, c, causal=True, scale=0.25), fullgraph=True, backend="aot_eager"
    )
    close(compiled(q, k, v), out, 1e-6)
    checks += 1
    print("torch.ops.fusedattn.attention_fwd, torch.compile(fullgraph=True): ok")

    # KV-cache decoding, when this build has it
    if hasattr(fusedattn, "decode_attention"):
        B, Lmax, Hq, Hkv, D, n = 2, 40, 4, 2, 32, 29
        qd = randn(B, 1, Hq, D)
        k_cache, v_cache = randn(B, Lmax, Hkv, D), randn(B, Lmax, Hkv, D)
        with torch.no_grad():
            out = fusedattn.decode_attention(qd, k_cache, v_cache, cache_seqlens=n)
        ref = fusedattn.attention(
            qd.transpose(1, 2), k_cache[:, :n].transpose(1, 2), v_cache[:, :n].transpose(1, 2), causal=True
        ).transpose(1, 2)
        close(out, ref, 1e-5)
        checks += 1
        print("fusedattn.decode_attention: ok")
    if hasattr(fusedattn, "merge_attention_states"):
        qm, km, vm = randn(2, 4, 5, 16), randn(2, 4, 30, 16), randn(2, 4, 30, 16)
        oa, la = fusedattn.attention(qm, km[:, :, :12], vm[:, :, :12], return_lse=True)
        ob, lb = fusedattn.attention(qm, km[:, :, 12:], vm[:, :, 12:], return_lse=True)
        o_all, l_all = fusedattn.attention(qm, km, vm, return_lse=True)
        with torch.no_grad():
            om, lm = fusedattn.merge_attention_states(oa.transpose(1, 2), la, ob.transpose(1, 2), lb)
        close(om, o_all.transpose(1, 2), 1e-5)
        close(lm, l_all, 1e-5)
        checks += 1
        print("fusedattn.merge_attention_states: ok")

    # packed variable-length sequences, forward and backward, against dense attention per sequence
    lens = [5, 0, 17]
    cu = torch.tensor([0, 5, 5, 22], dtype=torch.int32)
    qv = randn(22, 4, 32).requires_grad_()
    kv, vv = randn(22, 2, 32).requires_grad_(), randn(22, 2, 32).requires_grad_()
    out = fusedattn.varlen_attention(qv, kv, vv, cu, cu, max(lens), max(lens), causal=True)
    for s, e in ((0, 5), (5, 22)):
        dense = fusedattn.attention(*(t[s:e].detach().transpose(0, 1)[None] for t in (qv, kv, vv)), causal=True)
        close(out[s:e], dense[0].transpose(0, 1), 1e-5)
    assert all(t is not None for t in torch.autograd.grad(out.sum(), (qv, kv, vv)))
    checks += 1
    print("fusedattn.varlen_attention fwd+bwd: ok")

    # a model block on the kernels
    from fusedattn.transformer import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (2, 5), generator=g)
    with torch.no_grad():
        cached = model.generate(idx, 4, temperature=0)
        uncached = model.generate(idx, 4, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached), (cached, uncached)
    checks += 1
    print("fusedattn.transformer.GPT.generate (KV cache == no cache): ok")

    print(f"smoke: {checks} passed, 0 failed")


if __name__ == "__main__":
    main()
