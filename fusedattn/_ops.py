"""Loads the compiled kernels and registers what torch needs around them.

The schemas are declared once in C++ (csrc/torch_bindings.cpp); this module adds, per op:
  * a fake (meta) implementation, so torch.compile / FakeTensor tracing knows output shapes;
  * autograd (``attention_fwd`` -> ``attention_bwd``, ``varlen_fwd`` -> ``varlen_bwd``), so gradients flow
    through the op
    (the decode ops are inference-only and have none).
torch imports this module by itself when it needs the fake impls (``set_python_module``).
"""

from __future__ import annotations

import torch


def _check_torch_matches_build() -> None:
    """A binary built for another torch (major.minor) can crash in the C++ ABI: refuse it with a
    message that says what to do, before the library is loaded."""
    try:
        from ._build_torch import TORCH_VERSION
    except ImportError:  # not built (no binary to protect) or built by plain CMake
        return
    built, running = TORCH_VERSION.split("+")[0].split(".")[:2], torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        raise ImportError(
            f"fusedattn's compiled extension was built for torch {TORCH_VERSION}, but torch {torch.__version__} "
            f"is installed. Install torch {'.'.join(built)}.x, or rebuild fusedattn against this torch: "
            f"pip install --no-build-isolation --force-reinstall fusedattn (from source: pip install -e . "
            f"--no-build-isolation)."
        )


_check_torch_matches_build()
_C = None
_C_IMPORT_ERROR: str | None = None
try:  # the compiled extension registers torch.ops.fusedattn.* when it is loaded
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as e:  # not built
    _C_IMPORT_ERROR = f"{type(e).__name__}: {e}"


# Read once: the public functions consult it while torch.compile traces them, where a call into
# the pybind module would break the graph.
_BUILD_INFO: dict = dict(_C.build_info()) if _C is not None else {}


def build_info() -> dict:
    """What the compiled extension was built with (empty when it did not load)."""
    return dict(_BUILD_INFO)


def _check_one_device(op: str, **tensors) -> None:
    """The fake impls also serve the Meta dispatch key, which the dispatcher picks when any input is a meta
    tensor: an op called with inputs on different devices must raise there (as the kernels do), not answer
    with shapes."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise RuntimeError(
                f"fusedattn::{op}: all tensors must be on one device: {first[0]} is on {first[1]}, {name} on {t.device}"
            )


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through (as copies) and raises when they are differentiated: see no_double_backward."""

    @staticmethod
    def forward(ctx, op: str, n: int, *tensors):  # tensors: n gradients, then the inputs they depend on
        ctx.op = op
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"fusedattn::{ctx.op}: double backward is not supported (the fused backward is "
            f"first-order only); use backend='reference' or torch's math SDPA for higher-order "
            f"gradients"
        )


def no_double_backward(op: str, grads: tuple, inputs: tuple) -> tuple:
    """The fused backward kernels compute first-order gradients only. With ``create_graph=True`` (a gradient
    penalty, a Hessian-vector product) autograd would treat their outputs as constants and silently drop the
    second-order terms; instead, differentiating them raises (torch's own CPU SDPA raises there too), while the
    first-order gradients are still returned. Call from a backward, with the kernel run under no_grad;
    ``inputs``: the tensors the backward read (grad_out, q, k, v, ...), which the gradients depend on."""
    if not torch.is_grad_enabled():
        return grads
    deps = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    idx = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not deps or not idx:
        return grads
    out = list(grads)
    for i, g in zip(idx, _FirstOrderOnly.apply(op, len(idx), *(grads[i] for i in idx), *deps)):
        out[i] = g
    return tuple(out)


if _C is not None:

    @torch.library.register_fake("fusedattn::attention_fwd")
    def _attention_fwd_fake(q, k, v, attn_mask, scale, window_left, window_right, bottom_right, softcap):
        _check_one_device("attention_fwd", q=q, k=k, v=v, attn_mask=attn_mask)
        B, Hq, Lq, _ = q.shape
        out = q.new_empty((B, Hq, Lq, v.shape[-1]))  # (B, Hq, Lq, Dv)
        lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("fusedattn::attention_bwd")
    def _attention_bwd_fake(
        grad_out, q, k, v, out, lse, attn_mask, scale, window_left, window_right, bottom_right, softcap, grad_lse
    ):
        _check_one_device(
            "attention_bwd", grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse, attn_mask=attn_mask, grad_lse=grad_lse
        )
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))

    def _attention_fwd_setup_context(ctx, inputs, output):
        q, k, v, attn_mask, scale, window_left, window_right, bottom_right, softcap = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.params = (scale, window_left, window_right, bottom_right, softcap)
        ctx.set_materialize_grads(False)

    def _attention_fwd_backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        if grad_out is None and grad_lse is None:
            return None, None, None, None, None, None, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        scale, window_left, window_right, bottom_right, softcap = ctx.params
        with torch.no_grad():
            dq, dk, dv = torch.ops.fusedattn.attention_bwd(
                grad_out,
                q,
                k,
                v,
                out,
                lse,
                attn_mask,
                scale,
                window_left,
                window_right,
                bottom_right,
                softcap,
                grad_lse,
            )
        dq, dk, dv = no_double_backward("attention_fwd", (dq, dk, dv), (grad_out, grad_lse, q, k, v))
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd(
        "fusedattn::attention_fwd", _attention_fwd_backward, setup_context=_attention_fwd_setup_context
    )

    @torch.library.register_fake("fusedattn::varlen_fwd")
    def _varlen_fwd_fake(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        window_left,
        window_right,
        bottom_right,
        softcap,
    ):
        total_q, Hq, _ = q.shape
        out = q.new_empty((total_q, Hq, v.shape[-1]))  # (total_q, Hq, Dv)
        lse = q.new_empty((Hq, total_q), dtype=torch.float32)  # FlashAttention's varlen lse layout
        return out, lse

    @torch.library.register_fake("fusedattn::varlen_bwd")
    def _varlen_bwd_fake(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        window_left,
        window_right,
        bottom_right,
        softcap,
        grad_lse,
    ):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))

    def _varlen_fwd_setup_context(ctx, inputs, output):
        (
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            scale,
            window_left,
            window_right,
            bottom_right,
            softcap,
        ) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.params = (max_seqlen_q, max_seqlen_k, scale, window_left, window_right, bottom_right, softcap)
        ctx.set_materialize_grads(False)

    def _varlen_fwd_backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        no_grads = (None,) * 9  # cu_seqlens_q .. softcap
        if grad_out is None and grad_lse is None:
            return (None, None, None) + no_grads
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        with torch.no_grad():
            dq, dk, dv = torch.ops.fusedattn.varlen_bwd(
                grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.params, grad_lse
            )
        return no_double_backward("varlen_fwd", (dq, dk, dv), (grad_out, grad_lse, q, k, v)) + no_grads

    torch.library.register_autograd(
        "fusedattn::varlen_fwd", _varlen_fwd_backward, setup_context=_varlen_fwd_setup_context
    )

    # Decoding is inference-only: decode_fwd and merge_attention_states have no autograd (the public
    # wrappers in fusedattn/decode.py refuse inputs that require grad).
    @torch.library.register_fake("fusedattn::decode_fwd")
    def _decode_fwd_fake(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new,
        v_new,
        block_table,
        cache_batch_idx,
        scale,
        window_left,
        window_right,
        softcap,
        num_splits,
    ):
        _check_one_device(
            "decode_fwd",
            q=q,
            k_cache=k_cache,
            v_cache=v_cache,
            cache_seqlens=cache_seqlens,
            k_new=k_new,
            v_new=v_new,
            block_table=block_table,
            cache_batch_idx=cache_batch_idx,
        )
        B, Lq, Hq, _ = q.shape
        out = q.new_empty((B, Lq, Hq, v_cache.shape[-1]))  # (B, Lq, Hq, Dv)
        lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("fusedattn::merge_attention_states")
    def _merge_attention_states_fake(out_a, lse_a, out_b, lse_b):
        _check_one_device("merge_attention_states", out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
        return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape, dtype=torch.float32)
