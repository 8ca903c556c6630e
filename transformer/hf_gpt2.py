"""GPT-2 weights into our GPT: a transformers GPT2LMHeadModel (or its state dict) -> GPT. Nothing is downloaded and
transformers is not imported here: the caller hands over the model or state dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import GPT

__all__ = ["from_hf_gpt2", "load_hf_gpt2_state_dict"]


def from_hf_gpt2(hf_model, **overrides) -> "GPT":
    """A GPT with the weights of a transformers GPT2LMHeadModel (any size); overrides go to GPTConfig."""
    from .model import GPT, GPTConfig

    model = GPT(GPTConfig.from_hf_gpt2(hf_model.config, **overrides))
    load_hf_gpt2_state_dict(model, hf_model.state_dict())
    return model.to(next(hf_model.parameters()).dtype)


def load_hf_gpt2_state_dict(model: "GPT", sd: dict) -> None:
    """Copy a transformers GPT2LMHeadModel state dict into `model`. HF's Conv1D stores weights (in, out), so
    they are transposed into nn.Linear's (out, in); c_attn's columns are [q | k | v], heads contiguous, which is
    our fused qkv_proj layout."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    ours = {
        "wte.weight": "embed.tok.weight",
        "wpe.weight": "embed.pos.weight",
        "ln_f.weight": "norm.weight",
        "ln_f.bias": "norm.bias",
    }
    per_layer = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "attn.c_attn": "attn.qkv_proj",
        "attn.c_proj": "attn.out_proj",
        "mlp.c_fc": "ffn.fc",
        "mlp.c_proj": "ffn.proj",
    }
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
