"""Generate text with a small GPT on fusedattn kernels (KV cache through fusedattn.decode_attention).

    python transformer/examples/generate.py --prompt "Hello" --max-new-tokens 64          # random byte-level GPT
    python transformer/examples/generate.py --weights ckpt.pt --prompt "Hello"             # our GPT state dict
    python transformer/examples/generate.py --hf-gpt2 path/to/gpt2 --prompt "Hello"        # a local HF GPT-2 dir

Without --hf-gpt2 the model is byte-level (vocab 256): the prompt is its UTF-8 bytes. With --hf-gpt2 the
directory's tokenizer is used (transformers needed, nothing is downloaded). Prints the text, then tokens/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from fusedattn.transformer import GPT, GPTConfig


def build(args):
    """(model, encode, decode) for the arguments."""
    if args.hf_gpt2:
        import transformers

        hf = transformers.GPT2LMHeadModel.from_pretrained(args.hf_gpt2)
        tok = transformers.AutoTokenizer.from_pretrained(args.hf_gpt2)
        model = GPT.from_hf_gpt2(hf, backend=args.backend)
        return model, (lambda s: tok(s)["input_ids"]), tok.decode
    cfg = GPTConfig(
        vocab_size=256,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_kv_head=args.n_kv_head,
        n_embd=args.n_embd,
        backend=args.backend,
    )
    model = GPT(cfg)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    return model, (lambda s: list(s.encode())), (lambda ids: bytes(i % 256 for i in ids).decode(errors="replace"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="The attention kernel")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="generate this many samples of the prompt at once")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--paged", action="store_true", help="use a paged KV cache (page size 16)")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--backend", default="auto", help="fusedattn backend, or 'torch' for torch's sdpa")
    ap.add_argument("--weights", help="a state dict of our GPT (torch.save(model.state_dict()))")
    ap.add_argument("--hf-gpt2", help="a local directory holding a transformers GPT-2 (config, weights, tokenizer)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-kv-head", type=int, default=None)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model, encode, decode = build(args)
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]).eval()
    idx = torch.tensor([encode(args.prompt)] * args.batch, dtype=torch.long)  # (B, T)

    try:
        from tqdm import tqdm

        bar = tqdm(total=args.max_new_tokens, unit="tok", desc="generating")
    except ImportError:
        bar = None
    t0 = time.perf_counter()
    out = model.generate(
        idx,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        use_cache=not args.no_cache,
        paged=args.paged,
        generator=torch.Generator().manual_seed(args.seed),
        callback=(lambda tok: bar.update(1)) if bar is not None else None,
    )
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    for row in out.tolist():
        print(repr(decode(row)))
    new = args.batch * args.max_new_tokens
    print(
        f"{new} tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s (prompt {idx.shape[1]} tokens, "
        f"batch {args.batch}, {'no cache' if args.no_cache else 'paged' if args.paged else 'contiguous'} cache)"
    )


if __name__ == "__main__":
    main()
