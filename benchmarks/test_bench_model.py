"""pytest-benchmark entry points for the model family (the --quick cases; needs transformers):

    pytest benchmarks --benchmark-only                       # run and print the table
    pytest benchmarks --benchmark-only --benchmark-autosave  # save, later: --benchmark-compare
"""
import pytest
import torch

pytest.importorskip("transformers")

from fusedattn.bench import model as fam  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = fam.cases(quick=True, device=DEVICE, dtypes=None)
BACKENDS = {k: v for k, v in fam.backends(DEVICE, quick=True).items() if not isinstance(v, str)}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_model(benchmark, case, backend):
    fn = BACKENDS[backend]
    err, tol = fam.check(fn, case, DEVICE)  # correctness gate before timing
    assert err <= tol, f"{backend} is wrong on {case}: err {err:.2e} > {tol:.2e}"
    inputs = fam.make_inputs(case, DEVICE)

    def run():
        fam.call(fn, inputs, case)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(case=case, tokens=fam.work(case))
    benchmark.pedantic(run, warmup_rounds=1, rounds=5, iterations=1)
