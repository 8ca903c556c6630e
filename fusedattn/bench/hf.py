"""Hugging Face benchmark family: one transformers model per config and dtype, run with
``attn_implementation`` "fusedattn" (fusedattn.transformer.hf), "sdpa" and "eager" -- the same weights, switched
with ``set_attn_implementation`` between calls.

Models (random weights, ``torch.manual_seed(0)``, no download):
  * llama: LlamaForCausalLM, hidden 512, 4 layers, 8 query / 2 kv heads of 64, MLP 1376, vocab 32000;
  * gpt2: GPT2LMHeadModel at the same size (n_embd 512, 4 layers, 8 heads of 64, vocab 50257; no GQA).

Two phases per case, each timed as one call:
  * prefill: one forward over the (B, P) prompt into a fresh DynamicCache, ``logits_to_keep=1`` (as generate
    does: the logits of the last position only);
  * decode: N = 16 greedy steps through ``past_key_values`` (each step feeds the previous step's argmax), after
    the P prompt tokens already in the cache. The cache is built once per case by one "sdpa" prefill outside the
    timing and shared by every implementation: each call first rewinds it to the P prompt tokens (DynamicCache:
    ``crop``, a view; StaticCache of P + N slots: its write position), so every call starts from the same
    cached keys and values and the prefix is never written. The first fed token is the prefill's argmax.

Checks: decode -- the 16 x B generated tokens are compared with "sdpa"'s on the same case ("tokens = sdpa"). A
sequence may leave them only at a rounding tie: where sdpa's top-1 minus top-2 logit is at most TIE_ULPS = 2
units in the last place of the dtype (in bf16 with random weights the top two logits are often one bf16 step
apart; eager leaves sdpa's tokens there too). err = the sequences that leave them anywhere else, + 1 when the
logits differ from sdpa's by more than LOGITS_TOL (1e-3 fp32, 0.1 bf16) on steps with the same inputs
(tolerance 0); "(k ties)" counts the sequences that left at a tie. The largest |logits - sdpa logits| over the
steps with the same inputs is reported beside.
Prefill -- the last position's logits on a reduced copy (B <= 2, P <= 64) against the model in float64 (eager).
Attention share (decode, sdpa and fusedattn): the time inside transformers' attention function (the registered
callable wrapped by a perf_counter timer) over the time of the whole forward, summed over steps 2..N of one
untimed decode call (the check's). Each step of the other calls is timed too: "step ms" is their median,
"step ratio vs sdpa" sdpa's over fusedattn's (7 x 16 samples each: sturdier than the 5 call times on a machine
shared with other jobs). "bound" = 1 / (1 - sdpa's share): the decode speed-up over sdpa
if fusedattn's attention took no time at all.

"eager" materialises the (B, H, P, P) scores of a prefill: it is skipped where they would take more than
EAGER_MAX_GIB ("skipped (memory)"); its decode is timed at P = 1024 only ("skipped (cost)": the run's
time goes to sdpa vs fusedattn at 4k and 16k). Needs transformers; without it every backend is absent.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
import time
from typing import Optional

import torch

from .core import Row

name = "hf"
title = "Hugging Face models, attn_implementation fusedattn vs sdpa vs eager (prefill and decode)"
metric_name = "tokens/s"
metric_scale = 1.0
flush = False
in_all = False  # `bench all` leaves it out: the full grid takes over half an hour on 2 cores (name it)
formula = (
    "tokens/s = B*P / prefill time (one forward over the (B, P) prompt into a fresh DynamicCache, last-position "
    "logits) or B*N / decode time (N = 16 greedy one-token steps through past_key_values after P cached tokens; "
    "the cache is built once by an sdpa prefill and rewound to P before every call). Same weights and dtype for "
    "every implementation. Decode err = sequences whose greedy tokens leave sdpa's other than at a rounding tie "
    "(top-1 minus top-2 logit <= 2 ulps of the dtype) or whose logits differ by more than 1e-3 (fp32) / 0.1 "
    "(bf16) on the same inputs (must be 0), tokens = sdpa counts the "
    "identical tokens and the ties; prefill err = "
    "max |last logits - float64 eager| on a reduced copy. attn share = time inside the attention function / "
    "time of the step (steps 2..N of the check's untimed call); bound = 1 / (1 - sdpa share). step ms = median "
    "of every decode step of the case's untimed warm-up and timed calls; step ratio = sdpa step / fusedattn step."
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
N_STEPS = 16
LENGTHS = (1024, 4096, 16384)
EAGER_MAX_GIB = 2.0  # eager's prefill scores (B, H, P, P) above this are not run
TIE_ULPS = 2  # a greedy token may differ from sdpa's where sdpa's top two logits are this many ulps apart
LOGITS_TOL = {"fp32": 1e-3, "bf16": 1e-1, "fp16": 1e-1}  # |logits - sdpa logits| on steps with the same inputs
EAGER_DECODE_MAX_P = 1024  # eager decode (repeat_kv copies of the cache, fp32 scores) only up to this P: time
IMPLS = {"sdpa": "sdpa", "fusedattn": "fusedattn", "eager": "eager"}  # backend name -> attn_implementation
# name -> (kind, hidden, layers, heads, kv heads, vocab, MLP)
MODELS = {
    "llama": ("llama", 512, 4, 8, 2, 32000, 1376),
    "gpt2": ("gpt2", 512, 4, 8, 8, 50257, 2048),
    "llama-tiny": ("llama", 64, 2, 4, 2, 1000, 128),
}


class Skipped(Exception):
    """Raised by check for a case an implementation is not run on; the row's status becomes the message
    ("skipped (memory): ..." or "skipped (cost): ...")."""


def _case(model, phase, cache, B, P, dt, N=N_STEPS):
    return {"model": model, "phase": phase, "cache": cache, "B": B, "P": P, "N": N, "dtype": dt}


def cases(*, quick: bool, device: str, dtypes: Optional[list[str]]) -> list[dict]:
    dts = dtypes or (["fp32", "bf16"] if device == "cpu" else ["bf16", "fp16"])
    if quick:
        return [
            _case("llama-tiny", "decode", "dynamic", 2, 64, dts[0], N=4),
            _case("llama-tiny", "decode", "static", 2, 64, dts[0], N=4),
            _case("llama-tiny", "prefill", "dynamic", 2, 64, dts[0], N=4),
        ]
    out = []
    for model in ("llama", "gpt2"):
        caches = ("dynamic", "static") if model == "llama" else ("dynamic",)  # GPT-2 takes no StaticCache
        for phase in ("decode", "prefill"):
            for dt in dts:
                for B in (1, 8):
                    for P in LENGTHS:
                        for cache in caches if phase == "decode" else ("dynamic",):
                            out.append(_case(model, phase, cache, B, P, dt))
    return out


def _priority(c: dict) -> tuple:
    """Measured first: Llama decode at 4k/16k (the issue's bar), then Llama decode at 1k, GPT-2 decode, prefills
    (cheap ones first; the 16k batch-8 prefills last)."""
    if c["phase"] == "decode":
        rank = (0 if c["P"] >= 4096 else 1) if c["model"].startswith("llama") else 2
    else:
        rank = 3 + (c["B"] * c["P"] >= 65536)
    return (rank, c["model"] != "llama", c["P"] if rank == 0 else 0)


def run_order(cases: list[dict], device: str) -> list[dict]:
    return sorted(cases, key=_priority)  # stable: dtype, batch and cache kind keep the listed order


_models: dict = {}  # (model, dtype, device) -> the HF model (every implementation uses it)


def _model(case: dict, device: str):
    key = (case["model"], case["dtype"], device)
    if key not in _models:
        import transformers

        from fusedattn.transformer import hf as fhf

        fhf.register()
        transformers.logging.set_verbosity_error()
        kind, hidden, layers, heads, kv, vocab, mlp = MODELS[case["model"]]
        n_pos = max(LENGTHS) + 2 * N_STEPS
        if kind == "llama":
            cfg = transformers.LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=mlp,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv,
                max_position_embeddings=n_pos,
                bos_token_id=1,
                eos_token_id=2,
            )
            cls = transformers.LlamaForCausalLM
        else:
            cfg = transformers.GPT2Config(
                vocab_size=vocab, n_positions=n_pos, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=mlp
            )
            cls = transformers.GPT2LMHeadModel
        torch.manual_seed(0)
        _models[key] = cls._from_config(cfg, attn_implementation="sdpa").eval().to(device, DTYPES[case["dtype"]])
    return _models[key]


def _eager_score_gib(case: dict) -> float:
    heads = MODELS[case["model"]][3]
    return case["B"] * heads * case["P"] ** 2 * torch.finfo(DTYPES[case["dtype"]]).bits / 8 / 2**30


# --------------------------------------------------------------------------------------------------------------
# one case's state: prompt, the shared decode cache, sdpa's tokens, each implementation's check results
# --------------------------------------------------------------------------------------------------------------
_state: dict = {"key": None}
_prefilled: dict = {}  # (model, dtype, device, B, P) -> (DynamicCache, first token): the last one only
_results: dict = {}  # json(case) -> {backend: {"tokens_equal", "logits_diff", "attn_share"}}


def _key(case: dict) -> str:
    return json.dumps(case, sort_keys=True)


def _prompt(case: dict, device: str, seed: int = 0) -> torch.Tensor:
    vocab = MODELS[case["model"]][5]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (case["B"], case["P"]), generator=g).to(device)


def make_inputs(case: dict, device: str, requires_grad: bool = False, seed: int = 0) -> dict:
    """The case's inputs, built once per case (the check and the timed calls share them)."""
    if _state["key"] == (_key(case), device):
        return _state["inputs"]
    import transformers

    _state.update(key=None, inputs=None)
    model = _model(case, device)
    inputs = {"model": model, "prompt": _prompt(case, device, seed)}
    if case["phase"] == "decode":
        pkey = (case["model"], case["dtype"], device, case["B"], case["P"])
        if pkey not in _prefilled:
            _prefilled.clear()
            model.set_attn_implementation("sdpa")
            dyn = transformers.DynamicCache(config=model.config)
            with torch.no_grad():
                logits = model(inputs["prompt"], past_key_values=dyn, use_cache=True, logits_to_keep=1).logits
            _prefilled[pkey] = (dyn, logits[:, -1].argmax(-1, keepdim=True))
        dyn, first = _prefilled[pkey]
        _rewind(dyn, case["P"])  # a dynamic case run before may have left it at P + N
        if case["cache"] == "static":
            cache = transformers.StaticCache(config=model.config, max_cache_len=case["P"] + case["N"])
            with torch.no_grad():
                for i, layer in enumerate(dyn.layers):  # the prompt's keys/values, copied into slots 0..P-1
                    cache.update(layer.keys, layer.values, i)
        else:
            cache = dyn
        inputs.update(cache=cache, first=first)
    _state.update(key=(_key(case), device), inputs=inputs)
    return inputs


def _rewind(cache, P: int) -> None:
    """Back to the P prompt tokens: a DynamicCache is cropped (a view of its prefix), a StaticCache's write
    position is reset (the slots past P are rewritten by the next steps and masked until then)."""
    if not hasattr(cache.layers[0], "cumulative_length"):
        extra = cache.get_seq_length() - P
        if extra > 0:
            cache.crop(-extra)
    else:
        for layer in cache.layers:
            layer.cumulative_length.fill_(P)


class _AttnTimer:
    """Wraps the attention function registered under ``impl`` with a perf_counter timer (on CUDA with a
    synchronize around it) while active; ``seconds`` accumulates the time spent inside it."""

    def __init__(self, impl: str, device: str):
        from transformers import AttentionInterface

        self.iface, self.impl, self.device, self.seconds = AttentionInterface, impl, device, 0.0
        self.orig = AttentionInterface._global_mapping[impl]

    def __enter__(self):
        orig = self.orig

        def timed(*args, **kwargs):
            if self.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = orig(*args, **kwargs)
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            return out

        self.iface._global_mapping[self.impl] = timed
        return self

    def __exit__(self, *exc):
        self.iface._global_mapping[self.impl] = self.orig


def _decode(inputs: dict, case: dict, impl: str, share: bool = False, steps: Optional[list] = None):
    """N greedy steps from the rewound cache: (tokens (B, N), step logits (B, N, V), attention share or None).
    ``steps``: each step's seconds are appended to it."""
    model, cache, P, N = inputs["model"], inputs["cache"], case["P"], case["N"]
    model.set_attn_implementation(impl)
    _rewind(cache, P)
    tok, toks, logits_all = inputs["first"], [], []
    timer = _AttnTimer(impl, inputs["prompt"].device.type) if share else None
    attn, step = 0.0, 0.0
    for i in range(N):
        if timer is not None:
            timer.seconds = 0.0
            with timer:
                t0 = time.perf_counter()
                logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
                t = time.perf_counter() - t0
            if i > 0:  # step 1 pays first-call costs (allocations, the mask analysis' caches)
                attn, step = attn + timer.seconds, step + t
        else:
            t0 = time.perf_counter()
            logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
            if steps is not None:
                steps.append(time.perf_counter() - t0)
        tok = logits.argmax(-1, keepdim=True)
        toks.append(tok)
        logits_all.append(logits)
    return torch.cat(toks, 1), torch.stack(logits_all, 1), (attn / step if share and step > 0 else None)


def _prefill(inputs: dict, case: dict, impl: str) -> torch.Tensor:
    import transformers

    model = inputs["model"]
    model.set_attn_implementation(impl)
    cache = transformers.DynamicCache(config=model.config)
    return model(inputs["prompt"], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


class _Impl:
    """One implementation as a backend: fn(inputs, case) -> the prefill's last logits or the decode's tokens."""

    def __init__(self, impl: str):
        self.impl = impl

    def __call__(self, inputs: dict, case: dict):
        if case["phase"] == "prefill":
            return _prefill(inputs, case, self.impl)
        steps = _results.setdefault(_key(case), {}).setdefault(self.impl, {}).setdefault("steps", [])
        return _decode(inputs, case, self.impl, steps=steps)[0]


def backends(device: str, quick: bool = False) -> dict:
    """name -> fn(inputs, case); sdpa first: its decode tokens are what the others are checked against."""
    if importlib.util.find_spec("transformers") is None:
        return {n: "transformers is not installed (pip install transformers)" for n in IMPLS}
    return {n: _Impl(impl) for n, impl in IMPLS.items()}


def needs_grad(case: dict) -> bool:
    return False


def call(fn, inputs, case):
    with torch.no_grad():
        return fn(inputs, case)


def _sdpa_reference(inputs: dict, case: dict):
    res = _results.setdefault(_key(case), {}).setdefault("sdpa", {})
    if "tokens" not in res:
        with torch.no_grad():
            res["tokens"], res["logits"], res["attn_share"] = _decode(inputs, case, "sdpa", share=True)
    return res["tokens"], res["logits"]


def _compare_tokens(toks, logits, ref_tokens, ref_logits) -> dict:
    """Greedy tokens (B, N) and step logits (B, N, V) against sdpa's. A sequence may leave sdpa's tokens only at a
    rounding tie: at its first differing step sdpa's top-1 minus top-2 logit is at most TIE_ULPS units in the
    last place of the dtype at the logits' magnitude (the inputs are still the same there; from the next step on
    they are not, so later tokens are not compared). Returns tokens_equal, tokens_total, ties (sequences that left at a
    tie), not_ties (that left elsewhere: wrong) and logits_diff (the largest difference on same-input steps)."""
    B, N = toks.shape
    ties = not_ties = 0
    same_input = torch.ones(B, N, dtype=torch.bool, device=toks.device)
    for b in range(B):
        where = (toks[b] != ref_tokens[b]).nonzero()
        if len(where) == 0:
            continue
        i = int(where[0])
        same_input[b, i + 1 :] = False
        top2 = ref_logits[b, i].double().topk(2).values
        ulp = torch.finfo(ref_logits.dtype).eps * float(ref_logits[b, i].double().abs().max())
        if float(top2[0] - top2[1]) <= TIE_ULPS * ulp:
            ties += 1
        else:
            not_ties += 1
    diff = (logits.double() - ref_logits.double()).abs().amax(-1)  # (B, N)
    return {
        "tokens_equal": int((toks == ref_tokens).sum()),
        "tokens_total": toks.numel(),
        "ties": ties,
        "not_ties": not_ties,
        "logits_diff": float(diff[same_input].max()),
    }


def check(fn, case: dict, device: str) -> tuple[float, float]:
    """Decode: (sequences that leave sdpa's tokens other than at a rounding tie (_compare_tokens), + 1 if the
    logits differ from sdpa's by more than LOGITS_TOL on the same inputs; tolerance 0). Prefill: (max |last logits - float64
    eager|, dtype tolerance) on a reduced copy. Raises SkippedForMemory for eager past EAGER_MAX_GIB."""
    impl = fn.impl
    if impl == "eager" and case["phase"] == "prefill" and _eager_score_gib(case) > EAGER_MAX_GIB:
        raise Skipped(f"skipped (memory): the (B, H, P, P) scores would take {_eager_score_gib(case):.1f} GiB")
    if impl == "eager" and case["phase"] == "decode" and case["P"] > EAGER_DECODE_MAX_P:
        raise Skipped(f"skipped (cost): eager decode is timed up to P={EAGER_DECODE_MAX_P}")
    if case["phase"] == "decode":
        inputs = make_inputs(case, device)
        ref_tokens, ref_logits = _sdpa_reference(inputs, case)
        res = _results[_key(case)].setdefault(impl, {})
        if impl == "sdpa":
            toks, logits = ref_tokens, ref_logits
        else:
            with torch.no_grad():
                toks, logits, res["attn_share"] = _decode(inputs, case, impl, share=impl == "fusedattn")
        res.update(_compare_tokens(toks, logits, ref_tokens, ref_logits))
        return float(res["not_ties"] + (res["logits_diff"] > LOGITS_TOL[case["dtype"]])), 0.0
    small = dict(case, B=min(case["B"], 2), P=min(case["P"], 64))
    model = _model(small, device)
    prompt = _prompt(small, device, seed=1)
    ref_model = _float64(small, device)
    with torch.no_grad():
        out = fn({"model": model, "prompt": prompt}, small)
        ref = ref_model(prompt).logits[:, -1]
    return float((out.double() - ref).abs().max()), (1e-3 if case["dtype"] == "fp32" else 1e-1)


def _float64(case: dict, device: str):
    key = (case["model"], "float64", device)
    if key not in _models:
        import copy

        ref = copy.deepcopy(_model(case, device)).double()
        ref.set_attn_implementation("eager")
        _models[key] = ref
    return _models[key]


def should_time(case: dict, backend: str) -> bool:
    return True


def repeats(case: dict, default: int) -> int:
    """At most 3 repeats for prefills of 8k+ tokens, 2 from 64k tokens (a call of tens of seconds)."""
    if case["phase"] == "prefill" and case["B"] * case["P"] >= 65536:
        return min(default, 2)
    return min(default, 3) if case["phase"] == "prefill" and case["B"] * case["P"] >= 8192 else default


def measure_memory(case: dict) -> bool:
    return False  # a fresh process per row would redo the prefill that builds the cache


def work(case: dict) -> float:
    return case["B"] * (case["P"] if case["phase"] == "prefill" else case["N"])


def _res(r: Row, backend: Optional[str] = None) -> dict:
    return _results.get(_key(r.case), {}).get(IMPLS.get(backend or r.backend, ""), {})


def _share(r: Row, backend: Optional[str] = None) -> str:
    s = _res(r, backend).get("attn_share")
    return "-" if s is None else f"{100 * s:.0f}%"


def _tokens(r: Row) -> str:
    res = _res(r)
    if "tokens_total" not in res:
        return "-"
    ties = f" ({res['ties']} tie{'s' if res['ties'] > 1 else ''})" if res["ties"] else ""
    return f"{res['tokens_equal']}/{res['tokens_total']}{ties}"


def _min_ratio(r: Row) -> str:
    """sdpa's fastest call / fusedattn's: beside the ratio of medians, on a machine shared with other jobs."""
    ours, theirs = _res(r, "fusedattn").get("min_ms"), _res(r, "sdpa").get("min_ms")
    return "-" if not ours or not theirs else f"{theirs / ours:.2f}x"


def _step_ms(r: Row, backend: Optional[str] = None) -> Optional[float]:
    """The median of every single decode step timed in this case's calls (warm-up and timed calls: 7 x N)."""
    steps = _res(r, backend).get("steps")
    return 1e3 * statistics.median(steps) if steps else None


def _step_cell(r: Row, backend: Optional[str] = None) -> str:
    ms = _step_ms(r, backend)
    return "-" if ms is None else f"{ms:.1f}"


def _step_ratio(r: Row) -> str:
    """sdpa's median step / fusedattn's median step: the decode speed-up from N x (repeats + 2) samples each, less
    exposed than the call medians to other jobs' bursts."""
    ours, theirs = _step_ms(r, "fusedattn"), _step_ms(r, "sdpa")
    return "-" if not ours or not theirs else f"{theirs / ours:.2f}x"


def _bound(r: Row) -> str:
    s = _res(r, "sdpa").get("attn_share")
    return "-" if s is None or s >= 1 else f"{1 / (1 - s):.2f}x"


def _logits_diff(r: Row) -> str:
    d = _res(r).get("logits_diff")
    return "-" if d is None else f"{d:.1e}"


extra_columns = [
    ("tokens = sdpa", _tokens),
    ("logits diff vs sdpa", _logits_diff),
    ("attn share sdpa", lambda r: _share(r, "sdpa")),
    ("attn share fusedattn", lambda r: _share(r, "fusedattn")),
    ("bound", _bound),
    ("min ratio vs sdpa", _min_ratio),
    ("step ms sdpa", lambda r: _step_cell(r, "sdpa")),
    ("step ms fusedattn", lambda r: _step_cell(r, "fusedattn")),
    ("step ratio vs sdpa", _step_ratio),
]


def format_row(r: Row, rows: list[Row]) -> str:
    if r.status.startswith(f"error: {Skipped.__name__}: "):
        r.status = r.status.split(": ", 2)[2]  # a planned skip, not a failure
    if r.status == "ok" and r.backend in IMPLS:
        _results.setdefault(_key(r.case), {}).setdefault(IMPLS[r.backend], {})["min_ms"] = r.min_ms
    c = r.case
    head = f"{c['dtype']:5s} {c['model']:10s} {c['phase']:7s} {c['cache']:7s} B={c['B']:2d} P={c['P']:5d}"
    if r.status != "ok":
        return f"{head} {r.backend:9s} {r.status}"
    ours = next((x for x in rows if x.case == c and x.backend == "fusedattn" and x.status == "ok"), None)
    ratio = f" {r.median_ms / ours.median_ms:5.2f}x vs fusedattn" if ours and r.backend != "fusedattn" else ""
    extra = f" tokens {_tokens(r)} share {_share(r)}" if c["phase"] == "decode" else ""
    return (
        f"{head} {r.backend:9s} {r.median_ms:9.1f} ms [{r.min_ms:.1f}..{r.max_ms:.1f}] {r.metric:9.1f} tok/s "
        f"err {r.max_err:.1e}{extra}{ratio}"
    )


def plot(rows: list[Row], info: dict, out_dir: str, tag: str) -> list[str]:
    """Decode and prefill tokens/s against P, one panel per (model, phase, dtype, B, cache), log axes."""
    from .core import plot_vs_length

    ok = [dataclasses.replace(r, case=dict(r.case, L=r.case["P"])) for r in rows if r.status == "ok"]  # x: P
    return plot_vs_length(
        ok,
        info,
        out_dir,
        tag,
        family="HF models (attn_implementation)",
        group=lambda c: (c["model"], c["phase"], c["dtype"], c["B"], c["cache"]),
        title=lambda g: f"{g[0]} {g[1]} {g[2]} B={g[3]} {g[4]}",
        xlabel="prompt tokens P",
        ylabel="tokens/s",
    )
