"""Sampling and generation for GPT (gpt-fast's generate.py): prefill once, then one token per step through a KV
cache per layer (fusedattn.decode_attention), or the whole sequence recomputed each step (use_cache=False, the
reference for the cached path). GPT.generate() calls generate() here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .model import GPT

__all__ = ["generate", "sample"]


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits (B, V) -> tokens (B,): greedy at temperature 0, else top-k / top-p (nucleus) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: "GPT",
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos: Optional[int] = None,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    use_cache: bool = True,
    paged: bool = False,
    page_size: int = 16,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    callback=None,
) -> torch.Tensor:
    """Sample max_new_tokens after each prompt.

    idx: (B, T) prompts; attention_mask: (B, T), 1 on each row's real tokens, which must be contiguous
        (left padding, right padding or none). temperature 0 = greedy; top_k / top_p filter the distribution.
    eos: a row that samples it stops; its later tokens are pad_token_id (default eos).
    use_cache: decode with a KV cache per layer (paged if `paged`) through fusedattn.decode_attention;
        False recomputes the whole sequence each step (the reference for the cached path).
    callback: called with the (B,) new tokens after each step (e.g. a progress bar).
    Returns (B, T + max_new_tokens): each row's prompt followed by its new tokens, padded on the side the
    prompt was padded on (left-padded or unpadded input: simply idx followed by the new tokens). A batch of no
    prompts (B == 0) gives an empty (0, T + max_new_tokens) result, as torch's modules map an empty batch to an
    empty batch (the arguments are still checked; the model is not run).

    The model runs in eval mode (no dropout); each module's own mode (``training``) is restored afterwards, so a
    call in the middle of training leaves the model training.
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
    B, T = idx.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be (B, T) = {(B, T)} like idx, got {tuple(attention_mask.shape)}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(
            f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got temperature={temperature}, "
            f"top_k={top_k}, top_p={top_p}"
        )
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size {model.config.block_size}"
        )
    if B == 0:
        return idx.new_empty((0, T + max_new_tokens))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return _generate(
            model,
            idx,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            eos,
            attention_mask,
            use_cache,
            paged,
            page_size,
            pad_token_id,
            generator,
            callback,
        )
    finally:
        for m, training in modes:
            m.training = training


def _generate(
    model,
    idx,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    eos,
    attention_mask,
    use_cache,
    paged,
    page_size,
    pad_token_id,
    generator,
    callback,
) -> torch.Tensor:
    """generate() once its arguments are checked, for B >= 1 prompts, with the model in eval mode."""
    B, T = idx.shape
    dev = idx.device
    mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = mask.sum(1)  # (B,)
    if int(lengths.min()) < 1:
        raise ValueError("every prompt needs at least one real token (attention_mask row of zeros)")
    start = mask.long().argmax(1)  # first real token
    if not bool(
        (
            mask
            == (
                (torch.arange(T, device=dev) >= start[:, None])
                & (torch.arange(T, device=dev) < (start + lengths)[:, None])
            )
        ).all()
    ):
        raise ValueError("each row's real tokens (attention_mask == 1) must be contiguous")
    pad = pad_token_id if pad_token_id is not None else eos if eos is not None else 0
    # Move each row's real tokens to the front (right padding), so row b's token t sits at position t and its
    # cache holds exactly lengths[b] tokens after the prefill. Pads inside the model are token 0 (never
    # attended to); `pad` only goes into the returned tensor.
    gather = (start[:, None] + torch.arange(T, device=dev)).clamp(max=T - 1)  # (B, T)
    seq = torch.zeros((B, T + max_new_tokens), dtype=idx.dtype, device=dev)
    seq[:, :T] = torch.where(torch.arange(T, device=dev) < lengths[:, None], idx.gather(1, gather), 0)
    prompt_lengths, rows = lengths, torch.arange(B, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    done = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)  # new tokens kept per row

    caches = model.make_caches(B, T + max_new_tokens, paged=paged, page_size=page_size) if use_cache else None
    if use_cache:
        logits = model(seq[:, :T], caches=caches)  # prefill (B, T, V); pads sit after every real token
        for c in caches:
            c.seqlens[:B] = lengths.to(torch.int32)  # forget the pads: the next token overwrites them
        logits = logits[rows, lengths - 1]  # (B, V)
    steps = 0
    for step in range(max_new_tokens):
        if not use_cache:
            width = int(lengths.max())
            keep = torch.arange(width, device=dev) < lengths[:, None]  # (B, width)
            logits = model(seq[:, :width], attention_mask=keep)[rows, lengths - 1]
        tok = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos is not None:
            tok = torch.where(finished, torch.full_like(tok, eos), tok)  # finished rows keep feeding eos
            done = torch.where(~finished & (tok == eos), torch.full_like(done, step + 1), done)
            finished |= tok == eos
        seq[rows, lengths] = tok
        lengths, steps = lengths + 1, step + 1
        if callback is not None:
            callback(tok)
        if (eos is not None and bool(finished.all())) or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = model(tok[:, None], caches=caches)[:, -1]  # (B, V)
    new = seq[rows[:, None], prompt_lengths[:, None] + torch.arange(max_new_tokens, device=dev)]  # (B, N)
    new = new.masked_fill(torch.arange(max_new_tokens, device=dev) >= done.clamp(max=steps)[:, None], pad)
    if bool(mask[:, -1].all()):  # left padded or unpadded: the prompt as given, then the new tokens
        return torch.cat([idx, new], dim=1)
    out = torch.full((B, T + max_new_tokens), pad, dtype=idx.dtype, device=dev)
    out[:, :T] = torch.where(torch.arange(T, device=dev) < prompt_lengths[:, None], seq[:, :T], pad)
    return out.scatter(1, prompt_lengths[:, None] + torch.arange(max_new_tokens, device=dev), new)
