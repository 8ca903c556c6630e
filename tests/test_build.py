"""What the build reports, and the import-time refusal of a binary built for another torch."""

import sys
import types

import pytest
import torch

import fusedattn
from fusedattn import _ops


def test_build_info_names_what_was_compiled():
    info = _ops.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert "DEFAULT" in info["cpu_isas"].split(",")
    assert info["cpu_isa_selected"] in info["cpu_isas"].split(",")
    assert isinstance(info["cuda"], bool) and info["cuda_reason"]
    # decode_fwd's bound on num_splits (csrc/op_limits.h), the one constant the Python checks also use
    assert isinstance(info["max_splits"], int) and info["max_splits"] >= 1


def test_max_splits_is_the_ops_bound():
    """num_splits = max_splits is accepted by the raw CPU op, max_splits + 1 refused naming num_splits."""
    S = _ops.build_info()["max_splits"]
    q, k, v = torch.zeros(1, 1, 1, 8), torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8)
    seqlens = torch.tensor([4], dtype=torch.int32)
    out, _ = torch.ops.fusedattn.decode_fwd(q, k, v, seqlens, None, None, None, None, 1.0, -1, -1, 0.0, S)
    assert out.shape == (1, 1, 1, 8)
    with pytest.raises(RuntimeError, match="num_splits"):
        torch.ops.fusedattn.decode_fwd(q, k, v, seqlens, None, None, None, None, 1.0, -1, -1, 0.0, S + 1)


def test_ops_are_registered():
    for name in ("attention_fwd", "attention_bwd", "varlen_fwd", "varlen_bwd"):
        assert hasattr(torch.ops.fusedattn, name)


def test_mismatched_torch_is_refused(monkeypatch):
    fake = types.ModuleType("fusedattn._build_torch")
    fake.TORCH_VERSION, fake.TORCH_CUDA = "1.99.0+cu999", "99.9"
    monkeypatch.setitem(sys.modules, "fusedattn._build_torch", fake)
    with pytest.raises(ImportError, match=r"built for torch 1\.99\.0\+cu999.*rebuild"):
        _ops._check_torch_matches_build()


def test_matching_torch_is_accepted(monkeypatch):
    fake = types.ModuleType("fusedattn._build_torch")
    fake.TORCH_VERSION, fake.TORCH_CUDA = torch.__version__.split("+")[0] + "+other", None
    monkeypatch.setitem(sys.modules, "fusedattn._build_torch", fake)
    _ops._check_torch_matches_build()
    assert fusedattn.available_backends()["cpu"] is None
