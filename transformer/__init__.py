"""Model blocks on fusedattn kernels (installed as fusedattn.transformer).

    from fusedattn.transformer import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=256))
    out = model.generate(idx, max_new_tokens=64, temperature=0.8, top_k=50)   # KV cache via decode_attention

    from fusedattn.transformer import hf; hf.register()                       # attn_implementation="fusedattn"

model.py: attention / FFN / norm / position blocks, GPT; generate.py: sampling and cached generation;
seq2seq.py: Encoder, Decoder, Transformer (encoder-decoder); kv_cache.py: KVCache, PagedKVCache;
hf_gpt2.py: GPT-2 weights into GPT; hf.py: the Hugging Face transformers hook (imports transformers only when
register() is called).
"""

from .generate import generate, sample
from .hf_gpt2 import from_hf_gpt2, load_hf_gpt2_state_dict
from .kv_cache import KVCache, PagedKVCache
from .model import (
    GPT,
    Block,
    FeedForward,
    GPTConfig,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositions,
    attend,
    make_norm,
    set_attention_backend,
)
from .seq2seq import Decoder, Encoder, Transformer, TransformerConfig

__all__ = [
    "KVCache",
    "PagedKVCache",
    "GPT",
    "GPTConfig",
    "Block",
    "Decoder",
    "Encoder",
    "FeedForward",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "Transformer",
    "TransformerConfig",
    "attend",
    "generate",
    "sample",
    "from_hf_gpt2",
    "load_hf_gpt2_state_dict",
    "make_norm",
    "set_attention_backend",
]
