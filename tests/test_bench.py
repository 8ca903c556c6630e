"""The benchmark CLI end to end on a tiny case: tables, CSV/JSON, plot, correctness gate, info; the session's
--where / --time-cap / --bundle, and benchmarks/gpu_check.py's output budget and pairwise grid."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fusedattn import bench
from fusedattn.bench import attention as fam
from fusedattn.bench.core import TIME_CAP, Row, measure, parse_where, select_cases, time_round_robin

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny_cases(monkeypatch):
    tiny = [
        {"B": 1, "H": 2, "L": 64, "D": 16, "dtype": dt, "causal": c, "mode": m}
        for dt in ("fp32", "bf16")
        for c in (False, True)
        for m in ("fwd", "fwd+bwd")
    ]
    monkeypatch.setattr(fam, "cases", lambda **kw: tiny)
    return tiny


def test_bench_cli_writes_tables_and_plot(tiny_cases, tmp_path, capsys):
    bench.main(["attention", "--quick", "--repeats", "2", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    exts = ("csv", "json", "md", "png") if HAVE_MPL else ("csv", "json", "md")  # the plot needs matplotlib
    assert names == [f"cpu_attention_quick.{ext}" for ext in exts]
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


def test_where_filters_by_family_and_key():
    where = parse_where(["attention:L=64,128", "dtype=bf16"])
    assert where == [("attention", "L", ["64", "128"]), (None, "dtype", ["bf16"])]
    cases = [{"L": L, "dtype": dt} for L in (64, 128, 256) for dt in ("fp32", "bf16")]
    assert select_cases(cases, "attention", where) == [{"L": 64, "dtype": "bf16"}, {"L": 128, "dtype": "bf16"}]
    assert select_cases(cases, "decode", where) == [c for c in cases if c["dtype"] == "bf16"]
    with pytest.raises(ValueError, match="no 'Q'"):
        select_cases(cases, "attention", parse_where(["Q=1"]))
    with pytest.raises(ValueError, match="KEY=V1"):
        parse_where(["L"])


def test_time_cap_lists_the_cases_it_did_not_run(tiny_cases, tmp_path):
    """A deadline already past: no case is measured, each is listed as skipped, the tables are still written
    (bundled: one md/json/csv for both families)."""
    bench.main(
        ["attention", "--quick", "--repeats", "1", "--time-cap", "0", "--out", str(tmp_path), "--bundle", "bench"]
    )
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["families"]["attention"]["rows"]
    run = [r for r in rows if not r["status"].startswith("absent")]
    assert len(run) == 2 * len(tiny_cases) and all(r["status"] == TIME_CAP for r in run)
    assert TIME_CAP in (tmp_path / "bench.md").read_text()


def test_deadline_inside_a_case_skips_the_remaining_backends(monkeypatch):
    case = {"B": 1, "H": 2, "L": 32, "D": 8, "dtype": "fp32", "causal": False, "mode": "fwd"}
    ok = fam.backends("cpu", quick=True)["fusedattn"]
    clock = iter([0.0, 100.0, 100.0, 100.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock, 100.0))
    rows = bench.core.measure_case(fam, case, {"a": ok, "b": ok}, "cpu", repeats=1, memory=False, deadline=50.0)
    assert [r.status for r in rows] == ["ok", TIME_CAP] and rows[0].median_ms > 0


def test_bundle_holds_every_family_in_few_files(tiny_cases, tmp_path, monkeypatch):
    from fusedattn.bench import decode

    monkeypatch.setattr(decode, "cases", lambda **kw: [decode._case(1, 2, 64, "fp32", "contiguous", Hq=4, D=16)])
    monkeypatch.setattr(decode, "COPY_MIB", 4)
    monkeypatch.setattr(decode, "_copy_buf", None)
    bench.main(
        [
            "decode",
            "attention",
            "--quick",
            "--repeats",
            "1",
            "--where",
            "attention:causal=True",
            "--where",
            "attention:mode=fwd",
            "--out",
            str(tmp_path),
            "--bundle",
            "bench",
        ]
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    pngs = ["cpu_attention.png", "cpu_decode.png"] if HAVE_MPL else []
    assert names == sorted(["bench.csv", "bench.json", "bench.md"] + pngs)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert list(data["families"]) == ["decode", "attention"]
    att = [r for r in data["families"]["attention"]["rows"] if r["status"] == "ok"]
    assert {(r["case"]["causal"], r["case"]["mode"]) for r in att} == {(True, "fwd")}
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["family"] for r in rows} == {"decode", "attention"} and "% of copy" in rows[0]
    md = (tmp_path / "bench.md").read_text()
    assert "# Decode" in md and "# Attention" in md


def test_output_budget(tmp_path):
    gc = _gpu_check()
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("session.log", "a/grid.json", "a/b/bench.md"):
        (tmp_path / name).write_text("x")
    assert gc.check_budget(str(tmp_path), max_files=8, max_mib=16, max_depth=2) == []
    (tmp_path / "a" / "b" / "c").mkdir()
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "big.bin").write_bytes(b"\0" * (2 * 2**20))
    (tmp_path / "odd name.txt").write_text("x")
    os.symlink(tmp_path / "session.log", tmp_path / "link")
    problems = gc.check_budget(str(tmp_path), max_files=5, max_mib=1, max_depth=2)
    text = "\n".join(problems)
    assert "deep.txt: 3 folders deep" in text and "big.bin: 2.0 MiB" in text and "odd name.txt: an odd" in text
    assert "link: a link" in text and "files (at most 5)" in text


def test_grid_pairwise_covers_every_pair():
    gc = _gpu_check()
    factors = {"a": [1, 2, 3], "b": ["x", "y"], "c": [True, False], "d": [0, 1, 2]}
    cases = gc.pairwise(factors)
    for f, g in [(f, g) for f in factors for g in factors if f < g]:
        assert {(c[f], c[g]) for c in cases} == {(x, y) for x in factors[f] for y in factors[g]}
    assert gc.pairwise(factors) == cases  # deterministic
    assert len(cases) < 3 * 2 * 2 * 3


def test_grid_runs_a_few_cpu_cases(tmp_path):
    """The GPU grid's code on the cpu backend: one case per family, all within the 2x rule."""
    gc = _gpu_check()
    out = tmp_path / "grid.json"
    rc = gc.main(
        [
            "grid",
            "--device",
            "cpu",
            "--backends",
            "cpu",
            "--small",
            "--max-cases",
            "1",
            "--time-cap",
            "120",
            "--out",
            str(out),
        ]
    )
    doc = json.loads(out.read_text())
    assert rc == 0 and {c["family"] for c in doc["cases"]} == set(gc.FAMILIES)
    assert all(c["status"] == "pass" for c in doc["cases"]), doc["cases"]


def test_cuda_attention_run_order_covers_every_kind_at_a_length_first():
    cases = select_cases(
        fam.cases(quick=False, device="cuda", dtypes=None), "attention", parse_where(["D=64,128", "L=1024,4096,16384"])
    )
    order = fam.run_order(cases, "cuda")
    assert sorted(map(str, order)) == sorted(map(str, cases))
    kinds = {(c["mode"], c["D"], c["causal"]) for c in cases if c["dtype"] == "bf16"}
    assert {(c["mode"], c["D"], c["causal"]) for c in order[: len(kinds)]} == kinds
    assert {(c["dtype"], c["L"]) for c in order[: len(kinds)]} == {("bf16", 4096)}
    assert fam.run_order(cases, "cpu") == cases


def test_distributed_family_spawns_its_world_and_writes_tables(tmp_path, monkeypatch):
    """The distributed family end to end on tiny cases: a spawned 2-process gloo world, the correctness gate,
    both rows timed per case, the communication columns; `all` leaves it out; a ring needs 2 ranks."""
    from fusedattn.bench import distributed as dfam

    tiny = [
        dfam._case(2, 64, dt, c, m, H=2, D=16)
        for dt in ("fp32", "bf16")
        for c in (True, False)
        for m in ("fwd", "fwd+bwd")
    ]
    monkeypatch.setattr(dfam, "cases", lambda **kw: tiny)  # the parent picks the cases and hands them to the world
    bench.main(["distributed", "--repeats", "2", "--out", str(tmp_path)])
    exts = ("csv", "json", "md", "png") if HAVE_MPL else ("csv", "json", "md")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"cpu_distributed.{ext}" for ext in exts]
    data = json.loads((tmp_path / "cpu_distributed.json").read_text())
    rows = data["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 2 * len(tiny), [r["status"] for r in rows]
    assert [(r["case"], r["backend"]) for r in rows] == [(c, b) for c in tiny for b in ("fusedattn", "one_process")]
    for r in rows:
        assert r["median_ms"] > 0 and r["max_err"] < (1e-5 if r["case"]["dtype"] == "fp32" else 3e-2), r
    ring = [r for r in rows if r["backend"] == "fusedattn"]
    assert all(r["extra"]["compute_only_ms"] > 0 and r["extra"]["transfer_only_ms"] > 0 for r in ring)
    assert all(0 <= r["extra"]["wait_share"] <= 1 for r in ring)
    md = (tmp_path / "cpu_distributed.md").read_text()
    assert all(h in md for h in ("ratio vs one_process", "transfer share", "comm share", "wait share"))
    assert "distributed" in bench.FAMILIES and "distributed" not in bench.IN_ALL
    with pytest.raises(ValueError, match="--world-size"):
        dfam.run_family(device="cpu", dtypes=None, quick=True, repeats=1, out_dir=None, world_size=1)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_family_quick_decode_tokens_and_attention_share(tmp_path, monkeypatch):
    """bench hf --quick: decode (dynamic and static cache) and prefill rows for every attn_implementation, decode
    tokens identical to sdpa's, attention shares measured for sdpa and fusedattn; eager's prefill past the memory
    limit is a planned skip, not an error."""
    from fusedattn.bench import hf

    monkeypatch.setattr(hf, "EAGER_MAX_GIB", 0.0)
    bench.main(["hf", "--quick", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_hf_quick.json").read_text())
    rows = {(r["case"]["phase"], r["case"]["cache"], r["backend"]): r for r in data["rows"]}
    for cache in ("dynamic", "static"):
        for b in ("sdpa", "fusedattn", "eager"):
            r = rows[("decode", cache, b)]
            assert r["status"] == "ok" and r["median_ms"] > 0 and r["max_err"] == 0, r
            assert r["tokens = sdpa"] == "8/8"  # fp32, no ties here
        for b in ("sdpa", "fusedattn"):
            share = rows[("decode", cache, b)][f"attn share {b}"]
            assert share.endswith("%") and 0 < float(share[:-1]) <= 100
    assert rows[("prefill", "dynamic", "fusedattn")]["status"] == "ok"
    assert rows[("prefill", "dynamic", "eager")]["status"].startswith("skipped (memory)")
    md = (tmp_path / "cpu_hf_quick.md").read_text()
    assert "ratio vs sdpa" in md and "attn share fusedattn" in md and "step ratio vs sdpa" in md
    assert float(rows[("decode", "static", "fusedattn")]["step ms fusedattn"]) > 0


def test_hf_family_token_check_accepts_only_rounding_ties():
    """A sequence may leave sdpa's greedy tokens where sdpa's top two logits are within the implementations'
    logit difference (a tie), not where the winner was clear."""
    from fusedattn.bench.hf import _compare_tokens

    ref_logits = torch.zeros(2, 3, 4)
    ref_logits[:, :, 1] = 1.0  # sdpa picks token 1 everywhere, by a margin of 1
    ref_logits[0, 1, 2] = 1.0 - 1e-7  # except a near-tie (one fp32 ulp) at sequence 0, step 1
    ref_tokens = ref_logits.argmax(-1)
    logits = ref_logits.clone()
    logits[0, 1, 2] += 2e-7  # another rounding: token 2 wins
    logits[0, 2] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # after the tie the inputs differ: not compared
    res = _compare_tokens(logits.argmax(-1), logits, ref_tokens, ref_logits)
    assert (res["ties"], res["not_ties"], res["tokens_equal"], res["tokens_total"]) == (1, 0, 4, 6)
    assert 0 < res["logits_diff"] < 1e-6
    logits[1, 0, 3] = 1.5  # a clear winner (by 1) changed: wrong
    res = _compare_tokens(logits.argmax(-1), logits, ref_tokens, ref_logits)
    assert res["not_ties"] == 1


def test_features_family_checks_each_call_against_its_own_reference(tmp_path, monkeypatch):
    """bench features --quick: every feature row and its plain twin pass their checks and are timed; a feature
    call that ignored its feature would fail the check against the reference with it."""
    from fusedattn.bench import features as ffam

    small = [dict(c, L=64, B=2, Hq=4, Hkv=2, D=32) for c in ffam.cases(quick=True, device="cpu", dtypes=["fp32"])]
    monkeypatch.setattr(ffam, "cases", lambda **kw: small)
    bench.main(["features", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_features.json").read_text())
    rows = data["rows"]
    assert {r["case"]["feature"] for r in rows} == {"sinks", "rotary", "leftpad"}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    fns = ffam.backends("cpu")
    plain_as_feature = fns["fusedattn_plain"]
    monkeypatch.setattr(plain_as_feature, "with_feature", True)  # checked against the reference with the feature
    for case in small:
        err, tol = ffam.check(plain_as_feature, case, "cpu")
        assert err > tol, case
