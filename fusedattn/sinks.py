"""Attention sinks (gpt-oss): a learned logit per query head that joins every row's softmax denominator.

With s_h the sink of head h, a row's attention over keys j becomes ``exp(x_j) / (sum_j exp(x_j) + exp(s_h))``:
the sink takes a share of the probability mass and contributes no value. That is exactly the merge of the row's
attention state (out, lse) with a state of output 0 and log-sum-exp s_h (fusedattn.merge_attention_states'
rule), so every kernel serves it unchanged:

    lse' = logaddexp(lse, s_h)          out' = out * exp(lse - lse')     (= out * sigmoid(lse - s_h))

One elementwise pass over the output, O(L * Dv), beside the kernel's O(Lq * Lk * D). Gradients: autograd runs
through these two lines into the kernels' own backward, which takes the gradient of lse (dS += P * dlse), so q, k,
v and the sinks get exact gradients from the fused backward. A row that sees no key gives out 0 and lse = s_h.
"""

from __future__ import annotations

import torch


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, layout: str):
    """(out, lse) of attention without sinks -> with them. ``sinks`` (Hq,); ``layout`` says where the heads are:
    "bhld" out (B, Hq, L, Dv), lse (B, Hq, L); "blhd" out (B, L, Hq, Dv), lse (B, Hq, L);
    "varlen" out (total, Hq, Dv), lse (Hq, total). Returns out in its dtype and lse in float32."""
    s = sinks.to(torch.float32)
    s = s.view(-1, 1) if layout == "varlen" else s.view(1, -1, 1)  # broadcast against lse
    new_lse = torch.logaddexp(lse, s)  # lse -inf (no key) -> the sink
    w = torch.exp(lse - new_lse)  # the keys' share of the row's mass, (B, Hq, L) / (Hq, total)
    if layout == "bhld":
        w = w.unsqueeze(-1)
    elif layout == "blhd":
        w = w.transpose(1, 2).unsqueeze(-1)
    elif layout == "varlen":
        w = w.transpose(0, 1).unsqueeze(-1)
    else:
        raise ValueError(f"layout must be 'bhld', 'blhd' or 'varlen', got {layout!r}")
    return (out.to(torch.float32) * w).to(out.dtype), new_lse
