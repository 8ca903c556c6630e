"""Model benchmark family: our GPT (fusedattn.transformer, KV cache through fusedattn.decode_attention) vs
transformers' GPT2LMHeadModel with eager and sdpa attention, all with the same GPT-2 weights and dtype.

Two phases per case, each timed as one call:
  * prefill: the forward pass over a (B, P) prompt that fills a fresh KV cache (ours: one contiguous KVCache
    per layer; HF: its DynamicCache), logits for every position included;
  * decode: N single-token steps after a P-token prompt already in the cache (the cache is prefilled once,
    outside the timing, and rewound to P tokens before each call). Every backend feeds the same fixed tokens
    (teacher forcing), so all do identical work, and the check compares the last step's logits.
Tokens/s = tokens processed / time: B*P for prefill, B*N for decode. Weights are random (GPT-2 shapes, no
download). Needs transformers; without it the HF peers are listed as absent.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .core import Row

name = "model"
title = "GPT model (prefill and decode)"
metric_name = "tokens/s"
metric_scale = 1.0  # report tokens/s as is (the engine's default divides by 1e9 for GFLOP/s, GB/s)
flush = False
formula = (
    "tokens/s = B*P / prefill time (phase prefill: one forward over the (B, P) prompt filling a fresh KV "
    "cache) or B*N / decode time (phase decode: N one-token steps after P cached tokens). Same weights, "
    "dtype and fed tokens for every backend."
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = {  # GPT-2 shapes: (n_layer, n_head, n_embd, vocab)
    "gpt2-124M": (12, 12, 768, 50257),
    "gpt2-tiny": (2, 4, 128, 1000),
}


def _case(model, B, P, N, phase, dt):
    return {"model": model, "B": B, "P": P, "N": N, "phase": phase, "dtype": dt}


def cases(*, quick: bool, device: str, dtypes: Optional[list[str]]) -> list[dict]:
    dts = dtypes or (["fp32", "bf16"] if device == "cpu" else ["bf16", "fp16"])
    if quick:
        return [_case("gpt2-tiny", 2, 32, 8, phase, dts[0]) for phase in ("prefill", "decode")]
    return [
        _case("gpt2-124M", B, P, 32, phase, dt)
        for dt in dts
        for phase in ("prefill", "decode")
        for B in (1, 8)
        for P in (128, 1024)
    ]


_built: dict = {}  # (model, dtype, device) -> (hf model, ours), + its float64 oracle; one model at a time


def _models(case: dict, device: str):
    key = (case["model"], case["dtype"], device)
    if key not in _built:
        import transformers

        from fusedattn.transformer.model import GPT

        _built.clear()
        n_layer, n_head, n_embd, vocab = MODELS[case["model"]]
        cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=2048,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=0,
            eos_token_id=0,
        )
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
        ours = GPT.from_hf_gpt2(hf).eval()
        dtype = DTYPES[case["dtype"]]
        _built[key] = (hf.to(device, dtype), ours.to(device, dtype))
    return _built[key]


def make_inputs(case: dict, device: str, requires_grad: bool = False, seed: int = 0) -> dict:
    hf, ours = _models(case, device)
    g = torch.Generator().manual_seed(seed)
    vocab = MODELS[case["model"]][3]
    prompt = torch.randint(0, vocab, (case["B"], case["P"]), generator=g).to(device)
    fed = torch.randint(0, vocab, (case["B"], case["N"]), generator=g).to(device)
    inputs = {"hf": hf, "ours": ours, "prompt": prompt, "fed": fed, "state": {}}
    return inputs


def _ours(inputs: dict, case: dict) -> torch.Tensor:
    model, B, P, N = inputs["ours"], case["B"], case["P"], case["N"]
    if case["phase"] == "prefill":
        caches = model.make_caches(B, P + N)
        return model(inputs["prompt"], caches=caches)[:, -1]
    caches = inputs["state"].get("ours")
    if caches is None:  # prefill once, outside the timed calls
        caches = inputs["state"]["ours"] = model.make_caches(B, P + N)
        model(inputs["prompt"], caches=caches)
    for c in caches:
        c.seqlens.fill_(P)  # rewind to the prompt
    for i in range(N):
        logits = model(inputs["fed"][:, i : i + 1], caches=caches)
    return logits[:, -1]


def _hf(impl: str):
    def run(inputs: dict, case: dict) -> torch.Tensor:
        model, P, N = inputs["hf"], case["P"], case["N"]
        model.set_attn_implementation(impl)
        if case["phase"] == "prefill":
            return model(inputs["prompt"], use_cache=True).logits[:, -1]
        cache = inputs["state"].get(impl)
        if cache is None:
            cache = inputs["state"][impl] = model(inputs["prompt"], use_cache=True).past_key_values
        extra = cache.get_seq_length() - P
        if extra > 0:
            cache.crop(-extra)  # rewind to the prompt
        for i in range(N):
            out = model(inputs["fed"][:, i : i + 1], past_key_values=cache, use_cache=True)
        return out.logits[:, -1]

    return run


def backends(device: str, quick: bool = False) -> dict:
    """name -> fn(inputs, case) returning the last position's logits (B, V), or why the backend is absent."""
    have_hf = importlib.util.find_spec("transformers") is not None
    why = "transformers is not installed (pip install transformers)"
    return {
        "fusedattn": _ours if have_hf else why,  # our GPT is built from an HF GPT-2 state dict
        "hf_eager": _hf("eager") if have_hf else why,
        "hf_sdpa": _hf("sdpa") if have_hf else why,
    }


def needs_grad(case: dict) -> bool:
    return False


def call(fn, inputs, case):
    with torch.no_grad():
        return fn(inputs, case)


def check(fn, case: dict, device: str) -> tuple[float, float]:
    """(max |logits - float64 HF eager logits| of the last position, tolerance) on a reduced copy of the case
    (B <= 2, P <= 64, N <= 4), with the same weights."""
    small = dict(case, B=min(case["B"], 2), P=min(case["P"], 64), N=min(case["N"], 4))
    inputs = make_inputs(small, device, seed=1)
    out = call(fn, inputs, small)
    ref_model = _hf_float64(inputs["hf"], small, device)
    with torch.no_grad():
        seq = inputs["prompt"] if small["phase"] == "prefill" else torch.cat([inputs["prompt"], inputs["fed"]], 1)
        ref = ref_model(seq).logits[:, -1]
    err = (out.double() - ref).abs().max().item()
    return err, (1e-3 if case["dtype"] == "fp32" else 1e-1)


def _hf_float64(hf, case: dict, device: str):
    """A float64 eager copy of the HF model (the oracle), kept beside the models it was made from."""
    key = (case["model"], "float64", device)
    if key not in _built:
        import copy

        ref = copy.deepcopy(hf).double()
        ref.set_attn_implementation("eager")
        _built[key] = ref
    return _built[key]


def should_time(case: dict, backend: str) -> bool:
    return True


def repeats(case: dict, default: int) -> int:
    """At most 3 repeats for prefills of 8k+ tokens (~30 s a call on a 2-core CPU)."""
    return min(default, 3) if case["phase"] == "prefill" and case["B"] * case["P"] >= 8192 else default


def measure_memory(case: dict) -> bool:
    return True


def work(case: dict) -> float:
    return case["B"] * (case["P"] if case["phase"] == "prefill" else case["N"])


def format_row(r: Row, rows: list[Row]) -> str:
    c = r.case
    head = f"{c['dtype']:5s} {c['model']:10s} {c['phase']:7s} B={c['B']:2d} P={c['P']:5d} N={c['N']:3d}"
    if r.status != "ok":
        return f"{head} {r.backend:10s} {r.status}"
    ours = next((x for x in rows if x.case == c and x.backend == "fusedattn" and x.status == "ok"), None)
    ratio = f"{r.median_ms / ours.median_ms:6.2f}x vs ours" if ours and r.backend != "fusedattn" else ""
    return (
        f"{head} {r.backend:10s} {r.median_ms:9.2f} ms [{r.min_ms:.2f}..{r.max_ms:.2f}] {r.metric:9.1f} tok/s "
        f"err {r.max_err:.1e} {ratio}"
    )


def plot(rows: list[Row], info: dict, out_dir: str, tag: str) -> list[str]:
    """A grouped bar chart of tokens/s per case and backend."""
    from .core import try_matplotlib

    plt = try_matplotlib()
    ok = [r for r in rows if r.status == "ok"]
    if plt is None or not ok:
        return []
    labels = list(dict.fromkeys(f"{r.case['phase']} {r.case['dtype']}\nB={r.case['B']} P={r.case['P']}" for r in ok))
    names = list(dict.fromkeys(r.backend for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    width = 0.8 / len(names)
    for j, b in enumerate(names):
        vals = {
            f"{r.case['phase']} {r.case['dtype']}\nB={r.case['B']} P={r.case['P']}": r.metric
            for r in ok
            if r.backend == b
        }
        ax.bar([i + j * width for i in range(len(labels))], [vals.get(lab, 0) for lab in labels], width, label=b)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)
    ax.set_title(f"GPT-2 shapes on {info.get('gpu') or info['cpu']} ({info['threads']} threads)", fontsize=9)
    fig.tight_layout()
    path = f"{out_dir}/{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
