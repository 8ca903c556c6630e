"""Transformer blocks on fusedattn kernels, readable top to bottom (nanoGPT / gpt-fast style).

    attention core    attend(): fusedattn.attention, or torch's sdpa when backend="torch"
    building blocks   MultiHeadAttention (self / cross, MHA / GQA / MQA), FeedForward (GELU / ReLU / SwiGLU),
                      LayerNorm / RMSNorm, sinusoidal / learned / rotary positions, Block (pre-LN or post-LN)
    models            Encoder, Decoder, Transformer (encoder-decoder), GPT (decoder-only LM with generate())

Layouts: activations (B, T, C); heads (B, T, H, D) in the projections and the KV cache (fusedattn.decode_attention's
layout), transposed to (B, H, T, D) for fusedattn.attention. Padding masks are (B, T) bools, True = a real token.
The attention backend is one argument: "auto" / "cpu" / "cuda" / "triton" / "reference" (fusedattn) or "torch"
(torch.nn.functional.scaled_dot_product_attention, for comparison).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

import fusedattn
from fusedattn.decode import decode_attention

from .kv_cache import KVCache, PagedKVCache

__all__ = ["attend", "MultiHeadAttention", "FeedForward", "RotaryEmbedding", "SinusoidalPositions", "Block",
           "TransformerConfig", "Encoder", "Decoder", "Transformer", "GPTConfig", "GPT", "make_norm",
           "load_hf_gpt2_state_dict", "set_attention_backend"]

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
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
           key_padding_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
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
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]                        # (P, 1)
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
        ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv                    # (P, D/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, T, H, D), positions (B, T) -> x rotated, same shape and dtype."""
        cos = self.cos[positions][:, :, None, :]  # (B, T, 1, D/2)
        sin = self.sin[positions][:, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)       # (B, T, H, D/2) each
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# attention, feed-forward, norms, block
# ------------------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    """Multi-head attention: self (one fused QKV projection) or cross (Q from x, fused KV from the context).

    n_kv_head < n_head gives GQA (MQA at 1): each kv head serves n_head // n_kv_head query heads, never expanded.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: Optional[int] = None, *, cross: bool = False,
                 bias: bool = True, rotary: Optional[RotaryEmbedding] = None, backend: str = "auto"):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if d_model % n_head or n_head % n_kv_head:
            raise ValueError(f"need d_model % n_head == 0 and n_head % n_kv_head == 0, got d_model={d_model}, "
                             f"n_head={n_head}, n_kv_head={n_kv_head}")
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

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *, causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, seq_ids=None) -> torch.Tensor:
        """x (B, T, C); context (B, S, C) for cross attention; key_padding_mask (B, T or S) bool; positions (B, T)
        for rotary. With a KV cache (self attention only), k/v are appended to it and the queries attend to
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
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            if self.cross:
                raise ValueError("a KV cache is for self attention only")
            backend = "reference" if self.backend in ("torch", "reference") else "auto"
            y = cache.attend(q, k, v, seq_ids=seq_ids, causal=True, backend=backend)  # (B, T, H, D)
        else:
            y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                       key_padding_mask=key_padding_mask, backend=self.backend).transpose(1, 2)  # (B, T, H, D)
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

    def __init__(self, d_model: int, n_head: int, n_kv_head: Optional[int] = None, *, cross: bool = False,
                 ffn: str = "gelu", ffn_hidden: Optional[int] = None, norm: str = "layernorm", norm_eps: float = 1e-5,
                 prenorm: bool = True, bias: bool = True, dropout: float = 0.0,
                 rotary: Optional[RotaryEmbedding] = None, backend: str = "auto"):
        super().__init__()
        self.prenorm = prenorm
        self.attn = MultiHeadAttention(d_model, n_head, n_kv_head, bias=bias, rotary=rotary, backend=backend)
        self.norm1 = make_norm(norm, d_model, norm_eps, bias)
        self.cross_attn = MultiHeadAttention(d_model, n_head, n_kv_head, cross=True, bias=bias,
                                             backend=backend) if cross else None
        self.norm_cross = make_norm(norm, d_model, norm_eps, bias) if cross else None
        self.ffn = FeedForward(d_model, ffn_hidden, ffn, bias)
        self.norm2 = make_norm(norm, d_model, norm_eps, bias)
        self.drop = nn.Dropout(dropout)

    def _residual(self, x, norm, f):
        return x + self.drop(f(norm(x))) if self.prenorm else norm(x + self.drop(f(x)))

    def forward(self, x: torch.Tensor, *, causal: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
                memory: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, cache: Optional[Cache] = None, seq_ids=None):
        """x (B, T, C); memory (B, S, C) and memory_mask (B, S) for the cross attention. Returns (B, T, C)."""
        x = self._residual(x, self.norm1, lambda h: self.attn(h, causal=causal, key_padding_mask=key_padding_mask,
                                                              positions=positions, cache=cache, seq_ids=seq_ids))
        if self.cross_attn is not None:
            x = self._residual(x, self.norm_cross,
                               lambda h: self.cross_attn(h, memory, key_padding_mask=memory_mask))
        return self._residual(x, self.norm2, self.ffn)


class _Embedding(nn.Module):
    """Token embedding + absolute positions ("learned" / "sinusoidal"; "rotary" adds none here)."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, pos: str):
        super().__init__()
        if pos not in ("learned", "sinusoidal", "rotary"):
            raise ValueError(f"pos must be 'learned', 'sinusoidal' or 'rotary', got {pos!r}")
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = (nn.Embedding(max_len, d_model) if pos == "learned"
                    else SinusoidalPositions(max_len, d_model) if pos == "sinusoidal" else None)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        x = self.tok(idx)
        return x if self.pos is None else x + self.pos(positions)


def _positions(mask: Optional[torch.Tensor], B: int, T: int, device) -> torch.Tensor:
    """(B, T) positions: 0.. over the real tokens of each row (left padding shifts them), arange without a mask."""
    if mask is None:
        return torch.arange(T, device=device).expand(B, T)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------
# encoder-decoder
# ------------------------------------------------------------------------------------------------
@dataclass
class TransformerConfig:
    src_vocab_size: int = 1000
    tgt_vocab_size: int = 1000
    max_len: int = 512
    d_model: int = 256
    n_head: int = 4
    n_kv_head: Optional[int] = None
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    ffn: str = "relu"             # gelu | gelu_tanh | relu | swiglu
    ffn_hidden: Optional[int] = None
    norm: str = "layernorm"       # layernorm | rmsnorm
    norm_eps: float = 1e-5
    prenorm: bool = False         # the original paper is post-LN
    pos: str = "sinusoidal"       # sinusoidal | learned | rotary
    bias: bool = True
    dropout: float = 0.0
    backend: str = "auto"


def _blocks(cfg, n: int, cross: bool, rotary) -> nn.ModuleList:
    return nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.n_kv_head, cross=cross, ffn=cfg.ffn,
                               ffn_hidden=cfg.ffn_hidden, norm=cfg.norm, norm_eps=cfg.norm_eps, prenorm=cfg.prenorm,
                               bias=cfg.bias, dropout=cfg.dropout, rotary=rotary, backend=cfg.backend)
                         for _ in range(n))


def _rotary(cfg, max_len: int) -> Optional[RotaryEmbedding]:
    return RotaryEmbedding(cfg.d_model // cfg.n_head, max_len) if cfg.pos == "rotary" else None


class Encoder(nn.Module):
    """Embeddings + N bidirectional blocks (+ a final norm when pre-LN). src (B, S) -> memory (B, S, C)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.embed = _Embedding(cfg.src_vocab_size, cfg.d_model, cfg.max_len, cfg.pos)
        self.blocks = _blocks(cfg, cfg.n_encoder_layers, cross=False, rotary=_rotary(cfg, cfg.max_len))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.prenorm else nn.Identity()

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S = src.shape
        positions = _positions(src_mask, B, S, src.device)
        x = self.embed(src, positions)  # (B, S, C)
        for block in self.blocks:
            x = block(x, key_padding_mask=src_mask, positions=positions)
        return self.norm(x)


class Decoder(nn.Module):
    """Embeddings + N blocks of masked self attention + cross attention over the encoder output + FFN,
    then the LM head. tgt (B, T), memory (B, S, C) -> logits (B, T, V)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.embed = _Embedding(cfg.tgt_vocab_size, cfg.d_model, cfg.max_len, cfg.pos)
        self.blocks = _blocks(cfg, cfg.n_decoder_layers, cross=True, rotary=_rotary(cfg, cfg.max_len))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.prenorm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: Optional[torch.Tensor] = None,
                memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = tgt.shape
        positions = _positions(tgt_mask, B, T, tgt.device)
        x = self.embed(tgt, positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x, causal=True, key_padding_mask=tgt_mask, memory=memory, memory_mask=memory_mask,
                      positions=positions)
        return self.lm_head(self.norm(x))  # (B, T, V)


class Transformer(nn.Module):
    """Encoder-decoder (Vaswani et al. 2017). forward(src, tgt) -> logits (B, T, V), and the loss with targets."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, *, src_mask: Optional[torch.Tensor] = None,
                tgt_mask: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                ignore_index: int = -100):
        memory = self.encoder(src, src_mask)                        # (B, S, C)
        logits = self.decoder(tgt, memory, tgt_mask, src_mask)      # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
        return logits, loss

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, bos: int, max_len: int,
                      src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Greedy decoding (recomputing the decoder each step): src (B, S) -> (B, 1 + max_len), bos first."""
        memory = self.encoder(src, src_mask)
        out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        for _ in range(max_len):
            logits = self.decoder(out, memory, None, src_mask)[:, -1]  # (B, V)
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out


# ------------------------------------------------------------------------------------------------
# GPT
# ------------------------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024        # longest sequence (positions, cache)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # < n_head: GQA / MQA
    n_embd: int = 768
    ffn: str = "gelu_tanh"        # GPT-2's "gelu_new"
    ffn_hidden: Optional[int] = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True
    pos: str = "learned"          # learned | sinusoidal | rotary
    bias: bool = True
    tie_weights: bool = True
    dropout: float = 0.0
    backend: str = "auto"         # fusedattn backend or "torch"

    @classmethod
    def from_hf_gpt2(cls, hf_config, **overrides) -> "GPTConfig":
        """The config of a transformers GPT2Config (GPT-2 is pre-LN, learned positions, gelu_new, tied head)."""
        kw = dict(vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions, n_layer=hf_config.n_layer,
                  n_head=hf_config.n_head, n_embd=hf_config.n_embd, ffn_hidden=hf_config.n_inner,
                  norm_eps=hf_config.layer_norm_epsilon, ffn="gelu_tanh", norm="layernorm", prenorm=True,
                  pos="learned", bias=True, tie_weights=True)
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
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                attention_mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                caches: Optional[Sequence[Cache]] = None, seq_ids=None):
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
        if positions is None:
            if caches is not None:
                ids = caches[0]._ids(seq_ids, B)
                positions = caches[0].seqlens[ids].long()[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            else:
                positions = _positions(attention_mask, B, T, idx.device)
        if int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} is past block_size {self.config.block_size}")
        x = self.drop(self.embed(idx, positions))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, key_padding_mask=attention_mask if caches is None else None,
                      positions=positions, cache=None if caches is None else caches[i], seq_ids=seq_ids)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    # --- generation ------------------------------------------------------------------------------
    def make_caches(self, max_batch: int, max_seq_len: int, *, paged: bool = False, page_size: int = 16,
                    num_pages: Optional[int] = None) -> List[Cache]:
        """One KV cache per layer in the model's dtype and device: contiguous, or paged with page_size."""
        cfg, p = self.config, self.lm_head.weight
        hkv, d = cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
        if paged:
            num_pages = num_pages or max_batch * -(-max_seq_len // page_size)
            return [PagedKVCache(num_pages, page_size, max_batch, max_seq_len, hkv, d, dtype=p.dtype, device=p.device)
                    for _ in self.blocks]
        return [KVCache(max_batch, max_seq_len, hkv, d, dtype=p.dtype, device=p.device) for _ in self.blocks]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos: Optional[int] = None, *,
                 attention_mask: Optional[torch.Tensor] = None, use_cache: bool = True, paged: bool = False,
                 page_size: int = 16, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, callback=None) -> torch.Tensor:
        """Sample max_new_tokens after each prompt.

        idx: (B, T) prompts; attention_mask: (B, T), 1 on each row's real tokens, which must be contiguous
            (left padding, right padding or none). temperature 0 = greedy; top_k / top_p filter the distribution.
        eos: a row that samples it stops; its later tokens are pad_token_id (default eos).
        use_cache: decode with a KV cache per layer (paged if `paged`) through fusedattn.decode_attention;
            False recomputes the whole sequence each step (the reference for the cached path).
        callback: called with the (B,) new tokens after each step (e.g. a progress bar).
        Returns (B, T + max_new_tokens): each row's prompt followed by its new tokens, padded on the side the
        prompt was padded on (left-padded or unpadded input: simply idx followed by the new tokens).
        """
        self.eval()
        B, T = idx.shape
        dev = idx.device
        mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = mask.sum(1)  # (B,)
        if int(lengths.min()) < 1:
            raise ValueError("every prompt needs at least one real token (attention_mask row of zeros)")
        start = mask.long().argmax(1)  # first real token
        if not bool((mask == ((torch.arange(T, device=dev) >= start[:, None]) &
                              (torch.arange(T, device=dev) < (start + lengths)[:, None]))).all()):
            raise ValueError("each row's real tokens (attention_mask == 1) must be contiguous")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got temperature={temperature}, "
                             f"top_k={top_k}, top_p={top_p}")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                             f"{self.config.block_size}")
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

        caches = self.make_caches(B, T + max_new_tokens, paged=paged, page_size=page_size) if use_cache else None
        if use_cache:
            logits = self(seq[:, :T], caches=caches)  # prefill (B, T, V); pads sit after every real token
            for c in caches:
                c.seqlens[:B] = lengths.to(torch.int32)  # forget the pads: the next token overwrites them
            logits = logits[rows, lengths - 1]  # (B, V)
        steps = 0
        for step in range(max_new_tokens):
            if not use_cache:
                width = int(lengths.max())
                keep = torch.arange(width, device=dev) < lengths[:, None]  # (B, width)
                logits = self(seq[:, :width], attention_mask=keep)[rows, lengths - 1]
            tok = _sample(logits, temperature, top_k, top_p, generator)  # (B,)
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
                logits = self(tok[:, None], caches=caches)[:, -1]  # (B, V)
        new = seq[rows[:, None], prompt_lengths[:, None] + torch.arange(max_new_tokens, device=dev)]  # (B, N)
        new = new.masked_fill(torch.arange(max_new_tokens, device=dev) >= done.clamp(max=steps)[:, None], pad)
        if bool(mask[:, -1].all()):  # left padded or unpadded: the prompt as given, then the new tokens
            return torch.cat([idx, new], dim=1)
        out = torch.full((B, T + max_new_tokens), pad, dtype=idx.dtype, device=dev)
        out[:, :T] = torch.where(torch.arange(T, device=dev) < prompt_lengths[:, None], seq[:, :T], pad)
        return out.scatter(1, prompt_lengths[:, None] + torch.arange(max_new_tokens, device=dev), new)

    # --- GPT-2 weights ---------------------------------------------------------------------------
    @classmethod
    def from_hf_gpt2(cls, hf_model, **overrides) -> "GPT":
        """A GPT with the weights of a transformers GPT2LMHeadModel (any size; no download involved)."""
        model = cls(GPTConfig.from_hf_gpt2(hf_model.config, **overrides))
        load_hf_gpt2_state_dict(model, hf_model.state_dict())
        return model.to(next(hf_model.parameters()).dtype)


def _blocks_gpt(cfg: GPTConfig) -> nn.ModuleList:
    rotary = RotaryEmbedding(cfg.n_embd // cfg.n_head, cfg.block_size) if cfg.pos == "rotary" else None
    return nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.n_kv_head, ffn=cfg.ffn, ffn_hidden=cfg.ffn_hidden,
                               norm=cfg.norm, norm_eps=cfg.norm_eps, prenorm=cfg.prenorm, bias=cfg.bias,
                               dropout=cfg.dropout, rotary=rotary, backend=cfg.backend)
                         for _ in range(cfg.n_layer))


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            generator: Optional[torch.Generator]) -> torch.Tensor:
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


def load_hf_gpt2_state_dict(model: GPT, sd: dict) -> None:
    """Copy a transformers GPT2LMHeadModel state dict into `model`. HF's Conv1D stores weights (in, out), so
    they are transposed into nn.Linear's (out, in); c_attn's columns are [q | k | v], heads contiguous, which is
    our fused qkv_proj layout."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    ours = {"wte.weight": "embed.tok.weight", "wpe.weight": "embed.pos.weight",
            "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}
    per_layer = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
                 "mlp.c_fc": "ffn.fc", "mlp.c_proj": "ffn.proj"}
    target = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, tensor in sd.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # causal-mask buffers of old checkpoints; the head is tied to wte
            if name in ours:
                dst, transpose = ours[name], False
            else:
                parts = name.split(".")  # h.{i}.{module...}.{weight|bias}
                if parts[0] != "h" or ".".join(parts[2:-1]) not in per_layer:
                    raise KeyError(f"unexpected GPT-2 parameter {name!r}")
                module = per_layer[".".join(parts[2:-1])]
                dst = f"blocks.{parts[1]}.{module}.{parts[-1]}"
                transpose = parts[-1] == "weight" and not module.startswith("norm")
            if dst not in target:
                raise KeyError(f"GPT-2 parameter {name!r} has no counterpart {dst!r} in this model")
            src = tensor.t() if transpose else tensor
            if target[dst].shape != src.shape:
                raise ValueError(f"{name}: shape {tuple(src.shape)} != {dst} {tuple(target[dst].shape)}")
            target[dst].copy_(src)
            loaded.add(dst)
    missing = {k for k in target if k != "lm_head.weight"} - loaded
    if missing:
        raise KeyError(f"the GPT-2 state dict did not provide {sorted(missing)}")
