"""Transformer blocks and a GPT on fusedattn kernels, readable top to bottom (nanoGPT / gpt-fast style).

    attention core    attend(): fusedattn.attention, or torch's sdpa when backend="torch"
    building blocks   MultiHeadAttention (self / cross, MHA / GQA / MQA), FeedForward (GELU / ReLU / SwiGLU),
                      LayerNorm / RMSNorm, sinusoidal / learned / rotary positions, Block (pre-LN or post-LN)
    model             GPTConfig, GPT (decoder-only LM); its generate() is generate.py, its from_hf_gpt2() hf_gpt2.py

The encoder-decoder built from the same blocks is seq2seq.py; the KV caches are kv_cache.py.
Layouts: activations (B, T, C); heads (B, T, H, D) in the projections and the KV cache (fusedattn.decode_attention's
layout), transposed to (B, H, T, D) for fusedattn.attention. Padding masks are (B, T) bools, True = a real token.
The attention backend is one argument: "auto" / "cpu" / "cuda" / "triton" / "reference" (fusedattn) or "torch"
(torch.nn.functional.scaled_dot_product_attention, for comparison; with a KV cache, where sdpa has no cached
decode, "torch" runs fusedattn's "reference").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

import fusedattn
from . import hf_gpt2
from .generate import generate
from .kv_cache import KVCache, PagedKVCache

__all__ = [
    "attend",
    "MultiHeadAttention",
    "FeedForward",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "Block",
    "GPTConfig",
    "GPT",
    "make_norm",
    "set_attention_backend",
]

ATTN_BACKENDS = fusedattn.BACKENDS + ("torch",)
Cache = Union[KVCache, PagedKVCache]


def linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    """An nn.Linear (same parameters, shapes and state dict) whose weight is stored transposed in memory,
    (d_in, d_out) row-major, when the layer widens (d_out > d_in) -- GPT-2's Conv1D layout. F.linear then
    hands BLAS x @ W with W not transposed; for the one-token GEMVs of cached decoding that reads the widening
    projections (qkv, FFN up) ~30% faster with torch's CPU BLAS on AMD EPYC (benchmarks/results/README.md),
    while narrowing ones are faster as stored by nn.Linear. Strides survive .to(), load_state_dict and copies."""
    layer = nn.Linear(d_in, d_out, bias=bias)
    if d_out > d_in:
        weight = torch.empty(d_in, d_out, dtype=layer.weight.dtype, device=layer.weight.device).t()
        with torch.no_grad():
            weight.copy_(layer.weight)
        layer.weight = nn.Parameter(weight)
    return layer


# ------------------------------------------------------------------------------------------------
# attention core
# ------------------------------------------------------------------------------------------------
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention with a causal mask (bottom-right aligned) and a key padding mask combined.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq % Hkv == 0; key_padding_mask: (B, Lk) bool, True = attend.
    Returns (B, Hq, Lq, D). A query that sees no key gives 0 on every backend (torch's sdpa gives NaN there,
    so the "torch" path zeroes those rows).
    """
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Lk)
    if backend != "torch":
        return fusedattn.attention(q, k, v, causal=causal, attn_mask=mask, backend=backend)
    Lq, Lk = q.shape[2], k.shape[2]
    if causal:  # bottom-right: query i sees keys j <= i + Lk - Lq
        tri = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)  # (Lq, Lk)
        mask = tri if mask is None else mask & tri
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if mask is not None:
        sees_a_key = mask.any(-1, keepdim=True)  # (B or 1, 1, Lq or 1, 1)
        out = out.masked_fill(~sees_a_key, 0.0)
    return out


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every MultiHeadAttention inside `model` to `backend` (e.g. "torch" for a comparison run)."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.backend = backend
    return model


# ------------------------------------------------------------------------------------------------
# position encodings
# ------------------------------------------------------------------------------------------------
class SinusoidalPositions(nn.Module):
    """Fixed sin/cos table of "Attention Is All You Need": pe[p, 2i] = sin(p / 10000^(2i/C)), pe[p, 2i+1] = cos."""

    def __init__(self, max_len: int, dim: int, base: float = 10000.0):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (P, 1)
        inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(base) / dim))  # (C/2,)
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2] = torch.sin(pos * inv)
        pe[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
        self.register_buffer("pe", pe, persistent=False)  # (P, C)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # positions (B, T) -> (B, T, C)
        return self.pe[positions]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), half-split layout as in GPT-NeoX / Llama: dims (i, i + D/2) rotate
    together by angle p * base^(-2i/D)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv  # (P, D/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, T, H, D), positions (B, T) -> x rotated, same shape and dtype."""
        cos = self.cos[positions][:, :, None, :]  # (B, T, 1, D/2)
        sin = self.sin[positions][:, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, D/2) each
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# attention, feed-forward, norms, block
# ------------------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    """Multi-head attention: self (one fused QKV projection) or cross (Q from x, fused KV from the context).

    n_kv_head < n_head gives GQA (MQA at 1): each kv head serves n_head // n_kv_head query heads, never expanded.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: Optional[int] = None,
        *,
        cross: bool = False,
        bias: bool = True,
        rotary: Optional[RotaryEmbedding] = None,
        backend: str = "auto",
    ):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if d_model % n_head or n_head % n_kv_head:
            raise ValueError(
                f"need d_model % n_head == 0 and n_head % n_kv_head == 0, got d_model={d_model}, "
                f"n_head={n_head}, n_kv_head={n_kv_head}"
            )
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"backend must be one of {ATTN_BACKENDS}, got {backend!r}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.cross, self.rotary, self.backend = cross, rotary, backend
        q_dim, kv_dim = n_head * self.head_dim, n_kv_head * self.head_dim
        if cross:
            self.q_proj = linear(d_model, q_dim, bias=bias)
            self.kv_proj = linear(d_model, 2 * kv_dim, bias=bias)
        else:
            self.qkv_proj = linear(d_model, q_dim + 2 * kv_dim, bias=bias)
        self.out_proj = linear(q_dim, d_model, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        *,
        causal: bool = False,
        key_padding_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        seq_ids=None,
    ) -> torch.Tensor:
        """x (B, T, C); context (B, S, C) for cross attention; key_padding_mask (B, T or S) bool; positions (B, T)
        for rotary (with a KV cache and no positions, q and k rotate at the cache positions inside
        decode_attention's append). With a KV cache (self attention only), k/v are appended to it and the queries attend to
        everything cached through fusedattn.decode_attention (causal, bottom-right); padding is then expressed
        by the cache's per-sequence lengths, not by a mask. Returns (B, T, C)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if self.cross:
            if context is None:
                raise ValueError("cross attention needs a context (B, S, C)")
            q = self.q_proj(x).view(B, T, H, D)
            k, v = self.kv_proj(context).view(B, context.shape[1], 2, Hkv, D).unbind(2)  # (B, S, Hkv, D) each
        else:
            q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        rotary_in_cache = self.rotary is not None and cache is not None and positions is None
        if self.rotary is not None and not rotary_in_cache:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            if self.cross:
                raise ValueError("a KV cache is for self attention only")
            backend = "reference" if self.backend == "torch" else self.backend  # sdpa has no cached decode
            # Rotary at the cache positions (cache length + 0..T-1) is done by the append itself.
            rot = dict(rotary_cos=self.rotary.cos, rotary_sin=self.rotary.sin) if rotary_in_cache else {}
            y = cache.attend(q, k, v, seq_ids=seq_ids, causal=True, backend=backend, **rot)  # (B, T, H, D)
        else:
            y = attend(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                causal=causal,
                key_padding_mask=key_padding_mask,
                backend=self.backend,
            ).transpose(1, 2)  # (B, T, H, D)
        return self.out_proj(y.reshape(B, T, H * D))


class FeedForward(nn.Module):
    """Position-wise FFN: proj(act(fc(x))), or SwiGLU: w2(silu(w1 x) * w3 x). Hidden size 4C by default
    (SwiGLU: 2/3 of that, rounded up to a multiple of 8, which keeps the parameter count)."""

    ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")

    def __init__(self, d_model: int, hidden: Optional[int] = None, activation: str = "gelu", bias: bool = True):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be one of {self.ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        if hidden is None:
            hidden = 4 * d_model if activation != "swiglu" else -(-(8 * d_model // 3) // 8) * 8
        self.fc = linear(d_model, hidden, bias=bias)
        self.gate = linear(d_model, hidden, bias=bias) if activation == "swiglu" else None
        self.proj = linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        h = self.fc(x)  # (B, T, hidden)
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * h
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.proj(h)


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class Block(nn.Module):
    """Self attention (+ cross attention in a decoder) + FFN, each with a residual and a norm.

    pre-LN (GPT-2, Llama):     x = x + f(norm(x))
    post-LN (original paper):  x = norm(x + f(x))
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: Optional[int] = None,
        *,
        cross: bool = False,
        ffn: str = "gelu",
        ffn_hidden: Optional[int] = None,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        prenorm: bool = True,
        bias: bool = True,
        dropout: float = 0.0,
        rotary: Optional[RotaryEmbedding] = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.prenorm = prenorm
        self.attn = MultiHeadAttention(d_model, n_head, n_kv_head, bias=bias, rotary=rotary, backend=backend)
        self.norm1 = make_norm(norm, d_model, norm_eps, bias)
        self.cross_attn = (
            MultiHeadAttention(d_model, n_head, n_kv_head, cross=True, bias=bias, backend=backend) if cross else None
        )
        self.norm_cross = make_norm(norm, d_model, norm_eps, bias) if cross else None
        self.ffn = FeedForward(d_model, ffn_hidden, ffn, bias)
        self.norm2 = make_norm(norm, d_model, norm_eps, bias)
        self.drop = nn.Dropout(dropout)

    def _residual(self, x, norm, f):
        return x + self.drop(f(norm(x))) if self.prenorm else norm(x + self.drop(f(x)))

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Optional[torch.Tensor] = None,
        memory: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        seq_ids=None,
    ):
        """x (B, T, C); memory (B, S, C) and memory_mask (B, S) for the cross attention. Returns (B, T, C)."""
        x = self._residual(
            x,
            self.norm1,
            lambda h: self.attn(
                h, causal=causal, key_padding_mask=key_padding_mask, positions=positions, cache=cache, seq_ids=seq_ids
            ),
        )
        if self.cross_attn is not None:
            x = self._residual(x, self.norm_cross, lambda h: self.cross_attn(h, memory, key_padding_mask=memory_mask))
        return self._residual(x, self.norm2, self.ffn)


class _Embedding(nn.Module):
    """Token embedding + absolute positions ("learned" / "sinusoidal"; "rotary" adds none here)."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, pos: str):
        super().__init__()
        if pos not in ("learned", "sinusoidal", "rotary"):
            raise ValueError(f"pos must be 'learned', 'sinusoidal' or 'rotary', got {pos!r}")
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = (
            nn.Embedding(max_len, d_model)
            if pos == "learned"
            else SinusoidalPositions(max_len, d_model)
            if pos == "sinusoidal"
            else None
        )

    def forward(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        x = self.tok(idx)
        return x if self.pos is None else x + self.pos(positions)


def _positions(mask: Optional[torch.Tensor], B: int, T: int, device) -> torch.Tensor:
    """(B, T) positions: 0.. over the real tokens of each row (left padding shifts them), arange without a mask."""
    if mask is None:
        return torch.arange(T, device=device).expand(B, T)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------
# GPT
# ------------------------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence (positions, cache)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # < n_head: GQA / MQA
    n_embd: int = 768
    ffn: str = "gelu_tanh"  # GPT-2's "gelu_new"
    ffn_hidden: Optional[int] = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True
    pos: str = "learned"  # learned | sinusoidal | rotary
    bias: bool = True
    tie_weights: bool = True
    dropout: float = 0.0
    backend: str = "auto"  # fusedattn backend or "torch"

    @classmethod
    def from_hf_gpt2(cls, hf_config, **overrides) -> "GPTConfig":
        """The config of a transformers GPT2Config (GPT-2 is pre-LN, learned positions, gelu_new, tied head)."""
        kw = dict(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.n_positions,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            ffn_hidden=hf_config.n_inner,
            norm_eps=hf_config.layer_norm_epsilon,
            ffn="gelu_tanh",
            norm="layernorm",
            prenorm=True,
            pos="learned",
            bias=True,
            tie_weights=True,
        )
        kw.update(overrides)
        return cls(**kw)


class GPT(nn.Module):
    """Decoder-only LM. forward(idx (B, T)) -> logits (B, T, V); generate() decodes with a KV cache."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed = _Embedding(cfg.vocab_size, cfg.n_embd, cfg.block_size, cfg.pos)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = _blocks_gpt(cfg)
        self.norm = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias) if cfg.prenorm else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.embed.tok.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        caches: Optional[Sequence[Cache]] = None,
        seq_ids=None,
    ):
        """idx (B, T) token ids.

        Without caches: causal attention over idx, with attention_mask (B, T) (1 = real token, any padding
        side) masking padded keys; positions default to 0.. over each row's real tokens.
        With caches (one per layer, from make_caches): idx continues the sequences `seq_ids` (default 0..B-1)
        after the tokens they hold; positions default to cache length + 0..T-1. Pad on the right only: a row's
        pads are then never seen by its real tokens, and the caller sets the cache lengths afterwards.
        Returns logits (B, T, V), and (logits, loss) with targets (B, T) (-100 = ignore).
        """
        B, T = idx.shape
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one cache per layer ({len(self.blocks)}), got {len(caches)}")
        block_positions = positions  # None with caches: the rotary (if any) rotates at the cache positions
        if positions is None:
            if caches is not None:
                ids = caches[0]._ids(seq_ids, B)
                positions = caches[0].seqlens[ids].long()[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            else:
                positions = block_positions = _positions(attention_mask, B, T, idx.device)
        if int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} is past block_size {self.config.block_size}")
        x = self.drop(self.embed(idx, positions))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                causal=True,
                key_padding_mask=attention_mask if caches is None else None,
                positions=block_positions,
                cache=None if caches is None else caches[i],
                seq_ids=seq_ids,
            )
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    # --- generation ------------------------------------------------------------------------------
    def make_caches(
        self,
        max_batch: int,
        max_seq_len: int,
        *,
        paged: bool = False,
        page_size: int = 16,
        num_pages: Optional[int] = None,
    ) -> List[Cache]:
        """One KV cache per layer in the model's dtype and device: contiguous, or paged with page_size."""
        cfg, p = self.config, self.lm_head.weight
        hkv, d = cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        if paged:
            num_pages = num_pages or max_batch * -(-max_seq_len // page_size)
            return [
                PagedKVCache(num_pages, page_size, max_batch, max_seq_len, hkv, d, dtype=p.dtype, device=p.device)
                for _ in self.blocks
            ]
        return [KVCache(max_batch, max_seq_len, hkv, d, dtype=p.dtype, device=p.device) for _ in self.blocks]

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos: Optional[int] = None,
        **kwargs,
    ) -> torch.Tensor:
        """Sample max_new_tokens after each prompt idx (B, T) -> (B, T + max_new_tokens); see generate.generate
        (attention_mask, use_cache, paged, page_size, pad_token_id, generator, callback). Runs in eval mode and
        leaves the model in the mode it found it; no prompts (B == 0) give an empty (0, T + max_new_tokens)."""
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, eos, **kwargs)

    @classmethod
    def from_hf_gpt2(cls, hf_model, **overrides) -> "GPT":
        """A GPT with the weights of a transformers GPT2LMHeadModel (any size; no download involved)."""
        return hf_gpt2.from_hf_gpt2(hf_model, **overrides)


def _blocks_gpt(cfg: GPTConfig) -> nn.ModuleList:
    rotary = RotaryEmbedding(cfg.n_embd // cfg.n_head, cfg.block_size) if cfg.pos == "rotary" else None
    return nn.ModuleList(
        Block(
            cfg.n_embd,
            cfg.n_head,
            cfg.n_kv_head,
            ffn=cfg.ffn,
            ffn_hidden=cfg.ffn_hidden,
            norm=cfg.norm,
            norm_eps=cfg.norm_eps,
            prenorm=cfg.prenorm,
            bias=cfg.bias,
            dropout=cfg.dropout,
            rotary=rotary,
            backend=cfg.backend,
        )
        for _ in range(cfg.n_layer)
    )
