"""The benchmark CLI end to end on a tiny case: tables, CSV/JSON, plot, correctness gate, info."""
import json
import subprocess
import sys

import pytest

from fusedattn import bench
from fusedattn.bench import attention as fam
from fusedattn.bench.core import Row, measure, time_round_robin


@pytest.fixture
def tiny_cases(monkeypatch):
    tiny = [{"B": 1, "H": 2, "L": 64, "D": 16, "dtype": dt, "causal": c, "mode": m}
            for dt in ("fp32", "bf16") for c in (False, True) for m in ("fwd", "fwd+bwd")]
    monkeypatch.setattr(fam, "cases", lambda **kw: tiny)
    return tiny


def test_bench_cli_writes_tables_and_plot(tiny_cases, tmp_path, capsys):
    bench.main(["attention", "--quick", "--repeats", "2", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"cpu_attention_quick.{ext}" for ext in ("csv", "json", "md", "png")]
    data = json.loads((tmp_path / "cpu_attention_quick.json").read_text())
    assert data["machine"]["device"] == "cpu" and data["formula"].startswith("FLOPs")
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"fusedattn", "torch_sdpa"}
    assert len(ok) == 2 * len(tiny_cases) and all(r["median_ms"] > 0 and r["max_err"] < 3e-2 for r in ok)
    md = (tmp_path / "cpu_attention_quick.md").read_text()
    assert "ratio vs torch_sdpa" in md and "skipped in --quick" in md
    assert "fusedattn" in capsys.readouterr().out


def test_wrong_backend_is_reported_not_timed():
    case = {"B": 1, "H": 2, "L": 32, "D": 8, "dtype": "fp32", "causal": False, "mode": "fwd"}
    row = measure(fam, case, "broken", lambda q, k, v, causal: q * 0, "cpu", repeats=1, memory=False)
    assert isinstance(row, Row) and row.status.startswith("WRONG") and row.median_ms is None


def test_info_reports_backends():
    out = subprocess.run([sys.executable, "-m", "fusedattn", "info"], capture_output=True, text=True, check=True).stdout
    assert "cpu        available" in out and "reference  available" in out
    assert "cuda       unavailable:" in out or "cuda       available" in out


def test_round_robin_shuffles_the_order():
    """Every backend follows each of the others (a call pays for what the one before it left), and the
    order is the same from run to run."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = time_round_robin(fns, "cpu", repeats=12, flush=False)
    assert {n: len(t) for n, t in times.items()} == {n: 12 for n in "abcd"}
    timed = calls[4:]  # after the four warm-up calls
    before = {n: {p for p, c in zip(timed, timed[1:]) if c == n} for n in "abcd"}
    assert all(before[n] - {n} == set("abcd") - {n} for n in "abcd"), before
    calls.clear()
    time_round_robin(fns, "cpu", repeats=12, flush=False)
    assert calls[4:] == timed
