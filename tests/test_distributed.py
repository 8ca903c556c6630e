"""fusedattn.distributed: ring attention over torch.distributed (gloo, CPU processes), world sizes 2 and 4.

Each world is spawned once (torch.multiprocessing, file:// rendezvous) and runs every case of CASES; each rank
compares its shard of the ring's output and gradients with single-process ``fusedattn.attention()`` (or
``varlen_attention``) on the full sequence, both measured against the float64 reference: the 2x rule (3x for
gradients). The parametrized tests then assert per case, so a failure names its case.
"""

from __future__ import annotations

import os
import tempfile
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedattn
from fusedattn import distributed as fd
from fusedattn.reference import attention_ref, varlen_attention_ref

WORLDS = (2, 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _case(name, **kw):
    base = dict(
        dtype="fp32", causal=False, zigzag=False, Hq=4, Hkv=4, L=32, window=(-1, -1), softcap=0.0, layout="bhld"
    )
    base.update(kw)
    base["name"] = name
    return base


CASES = [
    _case(f"{dt}-{'causal' if c else 'full'}-{'zigzag' if z else 'plain'}", dtype=dt, causal=c, zigzag=z)
    for dt in DTYPES
    for c in (False, True)
    for z in (False, True)
] + [
    _case("fp32-causal-zigzag-gqa", causal=True, zigzag=True, Hkv=2),
    _case("bf16-causal-plain-mqa", dtype="bf16", causal=True, Hkv=1),
    _case("fp32-causal-zigzag-blhd", causal=True, zigzag=True, layout="blhd"),
    _case("fp32-causal-window", causal=True, window=(11, -1)),
    _case("fp32-window-both-sides", window=(5, 9)),
    _case("fp32-causal-plain-softcap", causal=True, softcap=3.0),
    _case("fp32-varlen-full", varlen=True),
    _case("fp32-varlen-causal-plain", varlen=True, causal=True, Hkv=2),
    _case("fp32-varlen-causal-zigzag", varlen=True, causal=True, zigzag=True, Hkv=2),
    _case("bf16-varlen-causal-zigzag", varlen=True, dtype="bf16", causal=True, zigzag=True),
]
VARLEN_LENGTHS = (16, 8, 24)  # each divisible by 2 x 4


def _inputs(case, seed):
    g = torch.Generator().manual_seed(seed)
    D = 16
    if case.get("varlen"):
        T = sum(VARLEN_LENGTHS)
        q = torch.randn(T, case["Hq"], D, generator=g)
        k, v = (torch.randn(T, case["Hkv"], D, generator=g) for _ in range(2))
        dout = torch.randn(T, case["Hq"], D, generator=g)
    else:
        B, L = 2, case["L"]
        q = torch.randn(B, case["Hq"], L, D, generator=g)
        k, v = (torch.randn(B, case["Hkv"], L, D, generator=g) for _ in range(2))
        dout = torch.randn(B, case["Hq"], L, D, generator=g)
    return q, k, v, dout


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _run_case(case, rank, world):
    dtype = DTYPES[case["dtype"]]
    q, k, v, dout = _inputs(case, seed=zlib.crc32(case["name"].encode()))
    kw = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    if case.get("varlen"):
        cu = torch.tensor([0, *VARLEN_LENGTHS]).cumsum(0).to(torch.int32)
        m = max(VARLEN_LENGTHS)
        ref = _grads(
            lambda a, b, c: varlen_attention_ref(a, b, c, cu, cu, m, m, compute_dtype=torch.float64, **kw),
            *(t.double() for t in (q, k, v, dout)),
        )
        base = _grads(
            lambda a, b, c: fusedattn.varlen_attention(a, b, c, cu, cu, m, m, **kw),
            *(t.to(dtype) for t in (q, k, v, dout)),
        )

        def sh(t):
            return fd.shard(t, rank, world, dim=0, zigzag=case["zigzag"], cu_seqlens=cu)

        ring = _grads(
            lambda a, b, c: fd.ring_attention(a, b, c, zigzag=case["zigzag"], cu_seqlens=cu, **kw),
            *(sh(t.to(dtype)) for t in (q, k, v, dout)),
        )
    else:
        ref = _grads(
            lambda a, b, c: attention_ref(a, b, c, compute_dtype=torch.float64, **kw),
            *(t.double() for t in (q, k, v, dout)),
        )
        base = _grads(lambda a, b, c: fusedattn.attention(a, b, c, **kw), *(t.to(dtype) for t in (q, k, v, dout)))
        blhd = case["layout"] == "blhd"

        def sh(t):
            s = fd.shard(t, rank, world, dim=2, zigzag=case["zigzag"])
            return s.transpose(1, 2).contiguous() if blhd else s

        ring = _grads(
            lambda a, b, c: fd.ring_attention(a, b, c, zigzag=case["zigzag"], layout=case["layout"], **kw),
            *(sh(t.to(dtype)) for t in (q, k, v, dout)),
        )
        if blhd:
            ring = [t.transpose(1, 2) for t in ring]
    errs = {}
    for name, r, b, f in zip(("out", "dq", "dk", "dv"), ring, base, ref):
        f_sh, b_sh = sh(f), sh(b)
        if not case.get("varlen") and case["layout"] == "blhd":
            f_sh, b_sh = f_sh.transpose(1, 2), b_sh.transpose(1, 2)
        assert r.dtype == dtype and r.shape == f_sh.shape, (name, r.dtype, r.shape, f_sh.shape)
        errs[name] = ((r.double() - f_sh).abs().max().item(), (b_sh.double() - f_sh).abs().max().item())
    return errs


def _worker(rank, world, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for case in CASES:
            try:
                results[case["name"]] = _run_case(case, rank, world)
            except Exception:
                results[case["name"]] = traceback.format_exc()
                raise  # the other ranks would wait on this one's sends forever: end the world
        dist.barrier()
    finally:
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


_RESULTS: dict = {}


def _world_results(world):
    if world not in _RESULTS:
        with tempfile.TemporaryDirectory() as tmp:
            init = os.path.join(tmp, "init")
            error = None
            try:
                mp.spawn(_worker, args=(world, init, tmp), nprocs=world, join=True)
            except Exception as e:  # a rank raised: its traceback is in its results
                error = e
            per_rank = []
            for r in range(world):
                p = os.path.join(tmp, f"rank{r}.pt")
                per_rank.append(torch.load(p) if os.path.exists(p) else {})
            _RESULTS[world] = (per_rank, error)
    return _RESULTS[world]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("world", WORLDS)
def test_ring_attention_matches_single_process(world, case):
    per_rank, error = _world_results(world)
    for rank, results in enumerate(per_rank):
        got = results.get(case["name"])
        assert got is not None, f"rank {rank} did not run {case['name']} (world error: {error})"
        assert not isinstance(got, str), f"rank {rank} raised:\n{got}"
        for name, (err, base) in got.items():
            factor = 2 if name == "out" else 3
            assert err <= factor * base + 1e-5, (
                f"rank {rank} {name}: max abs err {err:.3e} > {factor} x single-process err {base:.3e} + 1e-5"
            )


def test_zigzag_shard_roundtrip_and_layout():
    x = torch.arange(2 * 16).reshape(2, 16)
    shards = [fd.shard(x, r, 4, dim=1, zigzag=True) for r in range(4)]
    assert shards[1][0].tolist() == [2, 3, 12, 13]  # chunks 1 and 6 of 8
    assert torch.equal(fd.unshard(shards, dim=1, zigzag=True), x)
    cu = torch.tensor([0, 8, 24], dtype=torch.int32)
    t = torch.arange(24)
    parts = [fd.shard(t, r, 2, dim=0, zigzag=True, cu_seqlens=cu) for r in range(2)]
    assert parts[0].tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23]
    assert torch.equal(fd.unshard(parts, dim=0, zigzag=True, cu_seqlens=cu), t)
    with pytest.raises(ValueError, match="divisible by 8"):
        fd.shard(torch.zeros(1, 1, 12, 4), 0, 4, zigzag=True)


def test_band_skips_masks_and_windows():
    assert fd._band(4, 4, -4, -1, 0, "cpu") is None  # a future block under causal
    assert fd._band(4, 4, 4, -1, 0, "cpu") == (-1, -1, None)  # a past block: no mask
    assert fd._band(4, 4, 0, -1, 0, "cpu") == (-1, 0, None)  # the diagonal block
    assert fd._band(4, 4, 8, 3, 0, "cpu") is None  # beyond the left window
    assert fd._band(4, 4, 4, 5, 0, "cpu") == (1, -1, None)  # the window's edge as the kernel's window
    wl, wr, mask = fd._band(4, 4, 4, 2, 0, "cpu")  # the edge beyond the kernel's diagonal: a mask
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert (wl, wr) == (-1, -1) and torch.equal(mask[0, 0], j >= i + 4 - 2)


def test_ring_attention_bad_inputs():
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        fd.ring_attention(*(torch.randn(1, 2, 4, 8) for _ in range(3)))


def _bad_inputs_worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    msgs = []
    q = torch.randn(1, 2, 6, 8)
    for kwargs, args in (
        (dict(layout="bshd"), (q, q, q)),
        (dict(zigzag=True, window=(2, 0)), (q, q, q)),
        (dict(), (q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))),
        (dict(zigzag=True), (q[:, :, :5], q[:, :, :5], q[:, :, :5])),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), zigzag=True), (q[0].transpose(0, 1),) * 3),
    ):
        try:
            fd.ring_attention(*args, **kwargs)
            msgs.append("no error")
        except ValueError as e:
            msgs.append(str(e))
    torch.save(msgs, os.path.join(result_dir, f"bad{rank}.pt"))
    dist.destroy_process_group()


def test_ring_attention_bad_inputs_name_the_argument():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_bad_inputs_worker, args=(1, os.path.join(tmp, "init"), tmp), nprocs=1, join=True)
        msgs = torch.load(os.path.join(tmp, "bad0.pt"))
    for msg, word in zip(msgs, ("layout", "window", "same tokens", "even local length", "cu_seqlens")):
        assert word in msg, (word, msg)


# torch's context_parallel with our SDPA: (name, load balance, causal, dtype, Hkv); 4 query heads
CP_CASES = [
    (f"{'balanced' if lb else 'plain'}-{'causal' if c else 'full'}", lb, c, "fp32", 4)
    for lb in (True, False)
    for c in (True, False)
] + [("balanced-causal-bf16-gqa", True, True, "bf16", 2)]


def _context_parallel_worker(rank, world, init_file, result_dir):
    """Every CP_CASES case under torch.distributed.tensor.experimental.context_parallel with
    F.scaled_dot_product_attention = fd.sdpa_for_context_parallel, forward + backward; errors vs the float64
    reference of this rank's shard (torch's head-tail order when balanced, checked as fd.shard's zigzag) beside
    single-process fusedattn.attention's."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch_sdpa = F.scaled_dot_product_attention
    results = {}
    try:
        for name, balance, causal, dt, hkv in CP_CASES:
            dtype = DTYPES[dt]
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            q, dout = (torch.randn(2, 4, 32, 16, generator=g) for _ in range(2))
            k, v = (torch.randn(2, hkv, 32, 16, generator=g) for _ in range(2))
            ref = _grads(
                lambda a, b, c: attention_ref(a, b, c, causal=causal, compute_dtype=torch.float64),
                *(t.double() for t in (q, k, v, dout)),
            )
            base = _grads(
                lambda a, b, c: fusedattn.attention(a, b, c, causal=causal), *(t.to(dtype) for t in (q, k, v, dout))
            )
            buffers = [t.to(dtype) for t in (q, k, v, dout)]  # context_parallel shards them in place
            _cp_options.enable_load_balance = balance
            F.scaled_dot_product_attention = fd.sdpa_for_context_parallel
            try:
                with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
                    ring = _grads(
                        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=hkv != 4),
                        *buffers,
                    )
                restored = F.scaled_dot_product_attention is fd.sdpa_for_context_parallel
            finally:
                F.scaled_dot_product_attention = torch_sdpa
                _cp_options.enable_load_balance = True
            errs = {"restored": restored}
            for part, r, b, f in zip(("out", "dq", "dk", "dv"), ring, base, ref):
                f_sh, b_sh = (fd.shard(t, rank, world, dim=2, zigzag=balance) for t in (f, b))
                assert r.dtype == dtype and r.shape == f_sh.shape, (part, r.dtype, r.shape, f_sh.shape)
                errs[part] = ((r.double() - f_sh).abs().max().item(), (b_sh.double() - f_sh).abs().max().item())
            results[name] = errs
        dist.barrier()
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, os.path.join(result_dir, f"cp{rank}.pt"))
        dist.destroy_process_group()


def test_sdpa_under_torch_context_parallel():
    """torch's context_parallel (world 2, gloo, CPU) runs fd.sdpa_for_context_parallel as its SDPA: each rank's
    output and dq/dk/dv shard match single-process attention under the 2x (3x) rule, with and without torch's
    load balancing, causal and not, GQA; torch restores our function as F's SDPA when the context exits."""
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        error = None
        try:
            mp.spawn(_context_parallel_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        except Exception as e:
            error = e
        per_rank = [
            torch.load(p) if os.path.exists(p) else {} for p in (os.path.join(tmp, f"cp{r}.pt") for r in range(world))
        ]
    for rank, results in enumerate(per_rank):
        assert "error" not in results, f"rank {rank} raised:\n{results['error']}"
        for name, *_ in CP_CASES:
            got = results.get(name)
            assert got is not None, f"rank {rank} did not run {name} (world error: {error})"
            assert got.pop("restored"), f"{name}: F.scaled_dot_product_attention not restored after the context"
            for part, (err, base) in got.items():
                factor = 2 if part == "out" else 3
                assert err <= factor * base + 1e-5, (
                    f"{name} rank {rank} {part}: max abs err {err:.3e} > {factor} x single-process err {base:.3e}"
                )
