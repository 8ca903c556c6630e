"""Loads the compiled kernels and registers what torch needs around them.

The schemas are declared once in C++ (csrc/torch_bindings.cpp); this module adds, per op:
  * a fake (meta) implementation, so torch.compile / FakeTensor tracing knows output shapes;
  * autograd (``attention_fwd`` -> ``attention_bwd``, ``varlen_fwd`` -> ``varlen_bwd``), so gradients flow
    through the op, torch.func's transforms included (the decode ops are inference-only and have none).
``register_attention_pair`` does both for a (forward, backward) pair; kernels/attention.py calls it for the
Triton ops too, so the C++ and Triton pairs share one set of fake impls and one autograd.
torch imports this module by itself when it needs the fake impls (``set_python_module``).
"""

from __future__ import annotations

import warnings

import torch
from torch._functorch.utils import enable_single_level_autograd_function


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
    """Passes gradients through (as copies) and raises when they are differentiated: see no_double_backward.

    Written in the setup_context form (forward without ctx) with a generated vmap rule, so torch.func's
    transforms (grad, jacrev, vjp, vmap over the backward) can run through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op: str, n: int, *tensors):  # tensors: n gradients, then the inputs they depend on
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[0]

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


# ----------------------------------------------------------------------------------------------------------------
# Fake impls and autograd of the differentiable op pairs, written once for the C++ ops (attention_fwd/_bwd,
# varlen_fwd/_bwd) and the Triton ones (triton_attention_fwd/_bwd, triton_varlen_fwd/_bwd; kernels/attention.py).
# Every pair has one shape:
#   fwd(q, k, v, *rest) -> (out, lse)          rest: the mask or cu_seqlens, then the scalars
#   bwd(grad_out, q, k, v, out, lse, *rest, grad_lse) -> (dq, dk, dv)
# ----------------------------------------------------------------------------------------------------------------

_LIB = torch.library.Library("fusedattn", "FRAGMENT")  # holds the autograd kernels registered below


def _fwd_fake(layout: str, op: str):
    """The forward's fake impl: out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) for the dense layout, out
    (total_q, Hq, Dv) and lse (Hq, total_q) (FlashAttention's varlen lse layout) for the packed one."""

    def fake(q, k, v, *rest):
        if layout == "dense":
            _check_one_device(op, q=q, k=k, v=v, attn_mask=rest[0])
            B, Hq, Lq, _ = q.shape
            return q.new_empty((B, Hq, Lq, v.shape[-1])), q.new_empty((B, Hq, Lq), dtype=torch.float32)
        total_q, Hq, _ = q.shape
        return q.new_empty((total_q, Hq, v.shape[-1])), q.new_empty((Hq, total_q), dtype=torch.float32)

    return fake


def _bwd_fake(layout: str, op: str):
    """The backward's fake impl: dq, dk, dv shaped like q, k, v."""

    def fake(grad_out, q, k, v, out, lse, *rest):
        if layout == "dense":
            attn_mask, grad_lse = rest[0], rest[-1]
            _check_one_device(
                op, grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse, attn_mask=attn_mask, grad_lse=grad_lse
            )
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    return fake


def _register_autograd(fwd: str, bwd: str) -> None:
    """Autograd of ``fusedattn::<fwd>`` through ``fusedattn::<bwd>``, as a kernel for the Autograd key.

    What torch.library.register_autograd does, but through an autograd.Function in the setup_context form (forward
    without ctx), which torch.func's transforms require: torch.func.grad / jacrev / vjp then run through the op
    (register_autograd's generated Function has ``forward(ctx, ...)`` and fails there with "must override
    setup_context"). The forward runs the op below autograd; the backward runs ``bwd`` under no_grad and
    refuses to be differentiated again (no_double_backward)."""
    fwd_op = getattr(torch.ops.fusedattn, fwd).default
    bwd_op = getattr(torch.ops.fusedattn, bwd).default

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(q, k, v, *rest):
            with torch._C._AutoDispatchBelowAutograd():
                return fwd_op(q, k, v, *rest)

        @staticmethod
        def setup_context(ctx, inputs, output):
            q, k, v, *rest = inputs
            tensors = [r for r in rest if isinstance(r, torch.Tensor)]  # the mask or cu_seqlens
            ctx.save_for_backward(q, k, v, output[0], output[1], *tensors)
            ctx.rest = [None if isinstance(r, torch.Tensor) else r for r in rest]  # tensors: refilled in order
            ctx.tensor_slots = [i for i, r in enumerate(rest) if isinstance(r, torch.Tensor)]
            ctx.set_materialize_grads(False)

        @staticmethod
        def backward(ctx, grad_out, grad_lse):
            q, k, v, out, lse, *tensors = ctx.saved_tensors
            no_grads = (None,) * len(ctx.rest)
            if grad_out is None and grad_lse is None:
                return (None, None, None) + no_grads
            if grad_out is None:
                grad_out = torch.zeros_like(out)
            rest = list(ctx.rest)
            for i, t in zip(ctx.tensor_slots, tensors):
                rest[i] = t
            with torch.no_grad():
                dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, *rest, grad_lse)
            return no_double_backward(fwd, (dq, dk, dv), (grad_out, grad_lse, q, k, v)) + no_grads

    # Function.apply would hand the call to torch.func's custom_function_call when a transform is active; here,
    # inside the op's Autograd kernel, torch.func has already wrapped the tensors for its level (as for any op
    # with a derivative formula), so the node is recorded directly: autograd.Function's own apply, minus that
    # redirection.
    apply = super(torch.autograd.Function, Function).apply

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if not torch._C._are_functorch_transforms_active():
                return apply(*args)
            with enable_single_level_autograd_function():  # a node at torch.func's current level only
                return apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return fwd_op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    # ops made by torch.library.custom_op / triton_op come with an Autograd kernel (that raises without a
    # registered backward): this one replaces it, deliberately, so the dispatcher's "Overriding a previously
    # registered kernel" warning is not shown.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        _LIB.impl(fwd, autograd_kernel, "Autograd", with_keyset=True, allow_override=True)


def register_attention_pair(fwd: str, bwd: str, layout: str, fake: bool = True) -> None:
    """Registers what torch needs around the differentiable pair ``fusedattn::<fwd>`` / ``<bwd>``: fake impls
    (``fake=False`` for triton_op ops, whose fake impl torch derives from the launcher) and autograd.
    ``layout``: "dense" (q (B, Hq, Lq, D), an attn_mask after v) or "varlen" (q (total_q, Hq, D))."""
    if layout not in ("dense", "varlen"):
        raise ValueError(f"layout must be 'dense' or 'varlen', got {layout!r}")
    if fake:
        torch.library.register_fake(f"fusedattn::{fwd}", _fwd_fake(layout, fwd))
        torch.library.register_fake(f"fusedattn::{bwd}", _bwd_fake(layout, bwd))
    _register_autograd(fwd, bwd)


if _C is not None:
    register_attention_pair("attention_fwd", "attention_bwd", "dense")
    register_attention_pair("varlen_fwd", "varlen_bwd", "varlen")

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
