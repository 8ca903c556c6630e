"""Hugging Face transformers integration: ``attn_implementation="fusedattn"``.

    from fusedattn.transformer import hf
    hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fusedattn")
    model.generate(...)                             # prefill: fusedattn.attention; decode: decode_attention

``register()`` adds an attention function to transformers' ``AttentionInterface`` and a mask function to its
``AttentionMaskInterface`` under one name. The mask function is transformers' own SDPA mask builder: it returns
None when the mask is plain causal or plain full attention, and a (B, 1, Lq, Lk) boolean mask (True = attend) once
padding, sliding windows, a static cache or packed sequences are involved. transformers stays an optional
dependency: nothing here imports it until ``register()`` is called.

Which kernel a call gets:
  * decode steps -- at most ``DECODE_MAX_QUERIES`` query rows over more keys (Lk > Lq: transformers has
    concatenated the cache in front) -- run ``fusedattn.decode_attention`` directly over transformers' cache
    tensors: (B, Hkv, Lk, D) seen as (B, Lk, Hkv, D) through a transpose view (no copy; the last dimension is
    contiguous), GQA without ``repeat_kv``. The mask is turned into per-sequence key ranges: every row of
    sequence b must see exactly the keys ``start_b <= j < end_b`` with ``j <= end_b - Lq + i`` for query i
    (bottom-right causal; for Lq > 1 also the same range without the causal part). That covers left padding
    (masked-out leading positions), a static cache's unused tail and, for one query row, a sliding window.
    One start for the whole batch: a sliced view and ``cache_seqlens = end - start``. Different starts (left
    padding of a batch): a page-size-1 block table over an as_strided view whose page n is cache row n (pages
    one key apart, heads their usual stride apart; it stays inside the tensor's storage), with
    ``block_table[b, j] = page of key start_b + j``. The analysis is done once per mask tensor (transformers
    hands the same mask to every layer).
  * everything else -- prefill, masks that are not such ranges (arbitrary masks), float (additive) masks, rows
    that see no key, grads, and masked calls under torch.compile (the analysis reads the mask's values) --
    runs the dense ``fusedattn.attention`` with the mask. For a decode step with a mask that is not such ranges
    (or a float mask, or k and v strides that differ) that is a visible fallback: a ``UserWarning`` names the
    reason. Both kernels give the same result up to rounding; the decode kernel is the one built for few rows.
  * attention sinks (gpt-oss: transformers passes the module's ``sinks`` parameter as ``s_aux``) go to either
    kernel as ``sinks=`` (differentiable through the dense kernel); the fallbacks for dropout / attention weights
    use an eager computation with the sinks, since transformers' sdpa function would drop them.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

import fusedattn

__all__ = ["register", "fusedattn_attention_forward", "decode_plan", "NAME", "DECODE_MAX_QUERIES"]

NAME = "fusedattn"
# Decode steps: up to this many query rows with a cache go to decode_attention (its kernel processes all
# group * Lq query rows of a kv head together; chunked prefills of more rows are the dense kernel's job).
DECODE_MAX_QUERIES = 16
_backend = "auto"


class _Plan:
    """How one mask maps onto decode_attention: per-sequence key ranges [start, end) and causality."""

    def __init__(self, start: torch.Tensor, end: torch.Tensor, causal: bool):
        self.start, self.end, self.causal = start, end, causal  # (B,) int64 each
        self.uniform = bool((start == start[0]).all())
        self.s0 = int(start[0]) if self.uniform else 0  # the common start (uniform)
        self.seqlens = (end - (self.s0 if self.uniform else start)).to(torch.int32)  # (B,) keys per sequence
        self.tables: dict = {}  # (stride_B, stride_L) -> page-size-1 block table (B, max_len) int32


def decode_plan(
    mask: Optional[torch.Tensor], B: int, Lq: int, Lk: int, device, causal: bool = True
) -> "tuple[Optional[_Plan], str]":
    """(plan, "") when ``mask`` (None, or bool (B or 1, 1, Lq, Lk), True = attend) is per-sequence key ranges
    that decode_attention can express (see the module docstring), else (None, why not). ``causal``: what no
    mask means (the module's is_causal)."""
    if B == 0:
        return None, "an empty batch"
    if mask is None:  # sdpa's meaning: causal top-left (Lq > 1: a prompt into an empty static cache), else all keys
        start = torch.zeros(B, dtype=torch.int64, device=device)
        end = Lq if causal and Lq > 1 else Lk
        return _Plan(start, torch.full((B,), end, dtype=torch.int64, device=device), causal), ""
    if mask.dtype != torch.bool:
        return None, "a float (additive) attention mask"
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B) or tuple(mask.shape[2:]) != (Lq, Lk):
        return None, f"a mask of shape {tuple(mask.shape)} (not (B or 1, 1, Lq, Lk))"
    m = mask[:, 0]  # (Bm, Lq, Lk)
    j = torch.arange(Lk, device=device)
    last = m[:, -1]  # (Bm, Lk): the last query row sees the whole range
    start = torch.where(last, j, Lk).amin(-1)  # (Bm,) first visible key
    end = torch.where(last, j + 1, 0).amax(-1)  # (Bm,) one past the last
    in_range = (j >= start[:, None, None]) & (j < end[:, None, None])  # (Bm, 1, Lk)
    diag = end[:, None, None] - Lq + torch.arange(Lq, device=device)[:, None]  # (Bm, Lq, 1): bottom-right
    expected = in_range & (j <= diag)  # (Bm, Lq, Lk)
    if torch.equal(expected, m):
        causal = True
    elif Lq > 1 and torch.equal(in_range.expand_as(m), m):
        causal = False
        expected = in_range.expand_as(m)
    else:
        return None, "a mask that is not one key range per sequence (bottom-right causal inside)"
    if not bool(expected.any(-1).all()):  # a prompt's padded rows (static cache): the dense kernel, no warning
        return None, ""
    return _Plan(start.expand(B).contiguous(), end.expand(B).contiguous(), causal), ""


_last_plan: list = [None, -1, None, None]  # mask tensor (or None), its _version, the call's shape, plan or reason


def _plan_for(given, mask, B, Lq, Lk, device, causal):
    """decode_plan of ``mask`` (``given``, the tensor transformers passed, cut to Lk keys), cached for the mask
    tensor transformers hands every layer of one forward."""
    m, ver, key, res = _last_plan
    shape = (B, Lq, Lk, device, causal)
    if m is given and key == shape and (given is None or ver == given._version):
        return res
    res = decode_plan(mask, B, Lq, Lk, device, causal)
    _last_plan[:] = [given, -1 if given is None else given._version, shape, res]
    return res


def _page_table(plan: _Plan, key: torch.Tensor) -> Optional[torch.Tensor]:
    """Page-size-1 block table over ``_pages(key)``: row b lists the pages (cache rows) of keys start_b, ..."""
    sB, _, sL, _ = key.stride()
    if sL <= 0 or sB % sL:
        return None
    cached = plan.tables.get((sB, sL))
    if cached is not None:
        return cached
    B = key.shape[0]
    pages = _num_pages(key)
    if pages >= 2**31:
        return None
    n = int((plan.end - plan.start).max())
    first = torch.arange(B, device=key.device) * (sB // sL) + plan.start  # (B,) page of each sequence's first key
    table = (first[:, None] + torch.arange(n, device=key.device)).clamp_(max=pages - 1).to(torch.int32)
    plan.tables[(sB, sL)] = table
    return table


def _num_pages(key: torch.Tensor) -> int:
    B, _, L, _ = key.shape
    sB, _, sL, _ = key.stride()
    return ((B - 1) * sB + (L - 1) * sL) // sL + 1


def _pages(t: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, L, D) -> (num_pages, 1, Hkv, D): page n = the key n rows (stride_L apart) after the first, with
    its heads stride_H apart. Read-only; the pages overlap nothing the kernel reads twice for one key."""
    _, Hkv, _, D = t.shape
    _, sH, sL, _ = t.stride()
    return t.as_strided((_num_pages(t), 1, Hkv, D), (sL, sL, sH, 1))


def _decode(query, key, value, plan: _Plan, scaling, window, softcap, sinks=None):
    """decode_attention over transformers' caches; returns (B, Lq, Hq, D) or None when the layout does not fit."""
    q = query.transpose(1, 2)  # (B, Lq, Hq, D), a view
    if plan.uniform:
        s0 = plan.s0
        k = key[:, :, s0:].transpose(1, 2)  # (B, Lk - s0, Hkv, D), a view
        v = value[:, :, s0:].transpose(1, 2)
        table = None
    else:
        if key.stride() != value.stride():
            return None
        table = _page_table(plan, key)
        if table is None:
            return None
        k, v = _pages(key), _pages(value)
    return fusedattn.decode_attention(
        q,
        k,
        v,
        cache_seqlens=plan.seqlens,
        block_table=table,
        causal=plan.causal,
        scale=scaling,
        window=window,
        softcap=softcap,
        sinks=sinks,
        backend=_backend,
    )


def _eager_with_sinks(module, query, key, value, mask, dropout, scaling, is_causal, sinks):
    """The visible fallback for a model with attention sinks (gpt-oss's eager attention, in float32 statistics):
    scores, the sink logit appended to every row, softmax, the sink column dropped, dropout, @ value."""
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else D**-0.5
    k = key.repeat_interleave(Hq // Hkv, dim=1)
    v = value.repeat_interleave(Hq // Hkv, dim=1)
    acc = torch.promote_types(query.dtype, torch.float32)  # statistics in float32 at least
    s = torch.matmul(query, k.transpose(2, 3)).to(acc) * scale
    if mask is not None:
        mask = mask[..., :Lk]
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(acc)
    elif (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and Lq > 1:
        # transformers' meaning of no mask with Lq > 1 (sdpa's is_causal): top-left, as in the dense path below
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    logits = torch.cat([s, sinks.to(acc).reshape(1, Hq, 1, 1).expand(B, Hq, Lq, 1)], dim=-1)
    p = torch.softmax(logits, dim=-1)[..., :-1]
    p = torch.nn.functional.dropout(p, p=dropout, training=True).to(value.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), p


def fusedattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """transformers' attention-function signature: query (B, Hq, Lq, D), key / value (B, Hkv, Lk, D) (already
    concatenated with the cache), attention_mask (B or 1, 1, Lq, Lk) bool / additive float or None.
    Returns (attn_output (B, Lq, Hq, D), None)."""
    sinks = kwargs.get("s_aux")  # gpt-oss: one learned logit per query head joining every row's softmax
    if dropout > 0.0 or kwargs.get("output_attentions", False) or kwargs.get("position_bias") is not None:
        warnings.warn(
            "fusedattn: falling back to transformers' "
            + ("eager" if sinks is not None else "sdpa")
            + " attention (dropout > 0, output_attentions or a position bias: the fused kernels have none of these)",
            UserWarning,
            stacklevel=2,
        )
        if sinks is not None:  # sdpa cannot express sinks
            return _eager_with_sinks(module, query, key, value, attention_mask, dropout, scaling, is_causal, sinks)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and mask.shape[-1] > key.shape[2]:
        mask = mask[..., : key.shape[2]]  # some caches hand a mask wider than the keys they return
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    softcap = kwargs.get("softcap") or 0.0
    sliding = kwargs.get("sliding_window")
    if 0 < Lq <= DECODE_MAX_QUERIES and Lk > Lq and B > 0:
        out, why = None, ""
        needs_grad = any(t is not None and t.requires_grad for t in (query, key, value, sinks))
        if torch.is_grad_enabled() and needs_grad:
            why = None  # decode_attention is inference-only; the dense kernel has a backward (not a fallback)
        elif mask is not None and torch.compiler.is_compiling():
            why = None  # the mask analysis reads values (a graph break); the dense kernel takes the mask as is
        else:
            plan, why = _plan_for(attention_mask, mask, B, Lq, Lk, query.device, bool(is_causal))
            if plan is not None:
                window = (int(sliding) - 1, 0) if sliding is not None and mask is None else (-1, -1)
                out = _decode(query, key, value, plan, scaling, window, softcap, sinks)
                why = "a cache layout without a page-size-1 view (k and v strides differ)" if out is None else ""
        if out is not None:
            return out, None
        if why:
            warnings.warn(
                f"fusedattn: decode step (Lq={Lq}, Lk={Lk}) runs the dense kernel, not decode_attention: {why}",
                UserWarning,
                stacklevel=2,
            )
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    # Causal only when there is no mask (the mask then already holds it) and more than one query, as in
    # transformers' sdpa_attention_forward. transformers skips the mask of a causal call with Lk > Lq only for a
    # prompt into an empty static cache (sdpa's is_causal is top-left aligned): its first Lq keys are the prompt.
    causal = bool(is_causal) and mask is None and Lq > 1
    if causal and Lk > Lq:
        key, value = key[:, :, :Lq], value[:, :, :Lq]
    window = (-1, -1)
    if sliding is not None and mask is None:
        window = (int(sliding) - 1, 0 if causal else -1)
    out = fusedattn.attention(
        query,
        key,
        value,
        causal=causal,
        scale=scaling,
        attn_mask=mask,
        softcap=softcap,
        window=window,
        sinks=sinks,
        backend=_backend,
    )  # (B, Hq, Lq, D)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME, backend: str = "auto") -> str:
    """Register ``name`` (default "fusedattn") with transformers' AttentionInterface and AttentionMaskInterface,
    using fusedattn backend ``backend``. Idempotent. Returns the name to pass as ``attn_implementation``."""
    global _backend
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "fusedattn.transformer.hf.register() needs the `transformers` package (pip install transformers)"
        ) from e
    if backend not in fusedattn.BACKENDS:
        raise ValueError(f"backend must be one of {fusedattn.BACKENDS}, got {backend!r}")
    _backend = backend
    AttentionInterface.register(name, fusedattn_attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get("sdpa", sdpa_mask))
    return name
