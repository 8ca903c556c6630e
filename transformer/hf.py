"""Hugging Face transformers integration: ``attn_implementation="fusedattn"``.

    from fusedattn.transformer import hf
    hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fusedattn")
    model.generate(...)                             # prefill and decode run fusedattn.attention

``register()`` adds an attention function to transformers' ``AttentionInterface`` and a mask function to its
``AttentionMaskInterface`` under one name. The mask function is transformers' own SDPA mask builder: it returns
None when the mask is plain causal or plain full attention (we then pass ``causal`` to the kernel), and a
(B, 1, Lq, Lk) boolean mask (True = attend) once padding, sliding windows or packed sequences are involved,
which our kernel takes as ``attn_mask``. transformers stays an optional dependency: nothing here imports it
until ``register()`` is called.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

import fusedattn

__all__ = ["register", "fusedattn_attention_forward", "NAME"]

NAME = "fusedattn"
_backend = "auto"


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
    if dropout > 0.0 or kwargs.get("output_attentions", False) or kwargs.get("position_bias") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        warnings.warn(
            "fusedattn: falling back to transformers' sdpa attention (dropout > 0, output_attentions "
            "or a position bias: the fused kernels have none of these)",
            UserWarning,
            stacklevel=2,
        )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None:
        mask = mask[..., : key.shape[2]]  # some caches hand a mask wider than the keys they return
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
    # Causal only when there is no mask (the mask then already holds it) and more than one query; bottom-right
    # alignment is what a query block at the end of a cached sequence needs.
    causal = bool(is_causal) and mask is None and query.shape[2] > 1
    softcap = kwargs.get("softcap") or 0.0
    window = (-1, -1)
    if kwargs.get("sliding_window") is not None and mask is None:
        window = (int(kwargs["sliding_window"]) - 1, 0 if causal else -1)
    out = fusedattn.attention(
        query,
        key,
        value,
        causal=causal,
        scale=scaling,
        attn_mask=mask,
        softcap=softcap,
        window=window,
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
