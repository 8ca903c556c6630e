"""fusedattn: fused attention kernels for PyTorch.

    import fusedattn
    out = fusedattn.attention(q, k, v, causal=True)                 # flash-style API
    out = fusedattn.scaled_dot_product_attention(q, k, v)           # torch drop-in
    ref = fusedattn.attention_ref(q, k, v, causal=True)             # the PyTorch reference
    out = fusedattn.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)  # packed sequences
    out = fusedattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, k_new=k, v_new=v)  # KV cache
    k_cache = fusedattn.zeros_kv_cache((B, L_max, Hkv, D), dtype=torch.bfloat16)  # huge pages on the CPU

Kernels are torch ops in ``torch.ops.fusedattn`` (CPU: C++ in fusedattn._C). See README.md.
"""

import torch  # noqa: F401  (loads libtorch before our extension)

from . import _ops  # noqa: F401  (loads fusedattn._C: registers torch.ops.fusedattn.*)
from . import backward  # noqa: F401  (registers torch.ops.fusedattn.attention_backward / varlen_attention_backward)
from .api import attention, scaled_dot_product_attention
from .decode import decode_attention, merge_attention_states
from .dispatch import CHOICES as BACKENDS  # what backend= accepts: "auto" + dispatch.BACKENDS (the real ones)
from .dispatch import available_backends
from .memory import zeros_kv_cache
from .reference import attention_ref
from .varlen import varlen_attention

__version__ = "0.1.0"
__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "varlen_attention",
    "decode_attention",
    "merge_attention_states",
    "zeros_kv_cache",
    "attention_ref",
    "available_backends",
    "BACKENDS",
]
