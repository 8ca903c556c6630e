"""Model blocks on fusedattn kernels (installed as fusedattn.transformer).

    from fusedattn.transformer import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=256))
    out = model.generate(idx, max_new_tokens=64, temperature=0.8, top_k=50)   # KV cache via decode_attention

    from fusedattn.transformer import hf; hf.register()                       # attn_implementation="fusedattn"

model.py: attention / FFN / norm / position blocks, Encoder, Decoder, Transformer, GPT; kv_cache.py: KVCache,
PagedKVCache; hf.py: the Hugging Face transformers hook (imports transformers only when register() is called).
"""
from .kv_cache import KVCache, PagedKVCache
from .model import (GPT, Block, Decoder, Encoder, FeedForward, GPTConfig, MultiHeadAttention, RotaryEmbedding,
                    SinusoidalPositions, Transformer, TransformerConfig, attend, load_hf_gpt2_state_dict,
                    make_norm, set_attention_backend)

__all__ = ["KVCache", "PagedKVCache", "GPT", "GPTConfig", "Block", "Decoder", "Encoder", "FeedForward",
           "MultiHeadAttention", "RotaryEmbedding", "SinusoidalPositions", "Transformer", "TransformerConfig",
           "attend", "load_hf_gpt2_state_dict", "make_norm", "set_attention_backend"]
