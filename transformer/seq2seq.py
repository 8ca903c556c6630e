"""Encoder-decoder transformer (Vaswani et al. 2017) from the blocks in model.py: Encoder (bidirectional self
attention), Decoder (masked self attention + cross attention over the encoder output), Transformer (both, with
greedy decoding). Post-LN, sinusoidal positions and a ReLU FFN by default, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import Block, RotaryEmbedding, _Embedding, _positions, make_norm

__all__ = ["TransformerConfig", "Encoder", "Decoder", "Transformer"]


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
    ffn: str = "relu"  # gelu | gelu_tanh | relu | swiglu
    ffn_hidden: Optional[int] = None
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    prenorm: bool = False  # the original paper is post-LN
    pos: str = "sinusoidal"  # sinusoidal | learned | rotary
    bias: bool = True
    dropout: float = 0.0
    backend: str = "auto"


def _blocks(cfg, n: int, cross: bool, rotary) -> nn.ModuleList:
    return nn.ModuleList(
        Block(
            cfg.d_model,
            cfg.n_head,
            cfg.n_kv_head,
            cross=cross,
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
        for _ in range(n)
    )


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

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T = tgt.shape
        positions = _positions(tgt_mask, B, T, tgt.device)
        x = self.embed(tgt, positions)  # (B, T, C)
        for block in self.blocks:
            x = block(
                x, causal=True, key_padding_mask=tgt_mask, memory=memory, memory_mask=memory_mask, positions=positions
            )
        return self.lm_head(self.norm(x))  # (B, T, V)


class Transformer(nn.Module):
    """Encoder-decoder (Vaswani et al. 2017). forward(src, tgt) -> logits (B, T, V), and the loss with targets."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        *,
        src_mask: Optional[torch.Tensor] = None,
        tgt_mask: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
    ):
        memory = self.encoder(src, src_mask)  # (B, S, C)
        logits = self.decoder(tgt, memory, tgt_mask, src_mask)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
        return logits, loss

    @torch.no_grad()
    def greedy_decode(
        self, src: torch.Tensor, bos: int, max_len: int, src_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Greedy decoding (recomputing the decoder each step): src (B, S) -> (B, 1 + max_len), bos first."""
        memory = self.encoder(src, src_mask)
        out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        for _ in range(max_len):
            logits = self.decoder(out, memory, None, src_mask)[:, -1]  # (B, V)
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out
