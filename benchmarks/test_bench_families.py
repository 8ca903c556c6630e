"""pytest-benchmark entry points for every benchmark family (its --quick cases), one test parametrized over
family x case x backend:

    pytest benchmarks --benchmark-only                       # run and print the table
    pytest benchmarks --benchmark-only --benchmark-autosave  # save, later: --benchmark-compare
    pytest benchmarks --benchmark-only -k decode             # one family

The cases, peers, correctness check and work formula come from fusedattn/bench/<family>.py; the model family
needs transformers (skipped without it).
"""

import importlib.util

import pytest
import torch

from fusedattn.bench import FAMILIES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# what benchmark.extra_info calls each family's work (family.work(case) / scale)
WORK = {"attention": ("gflop", 1e9), "decode": ("gbytes", 1e9), "model": ("tokens", 1)}
NEEDS = {"model": "transformers"}


def _params():
    params = []
    for name, fam in FAMILIES.items():
        need = NEEDS.get(name)
        if need and importlib.util.find_spec(need) is None:
            params.append(
                pytest.param(
                    name, None, None, id=name, marks=pytest.mark.skip(reason=f"the {name} family needs {need}")
                )
            )
            continue
        backends = [k for k, v in fam.backends(DEVICE, quick=True).items() if not isinstance(v, str)]
        for case in fam.cases(quick=True, device=DEVICE, dtypes=None):
            case_id = "-".join(f"{k}{v}" for k, v in case.items())
            params += [pytest.param(name, case, b, id=f"{name}-{case_id}-{b}") for b in backends]
    return params


@pytest.mark.parametrize("family,case,backend", _params())
def test_bench(benchmark, family, case, backend):
    fam = FAMILIES[family]
    fn = fam.backends(DEVICE, quick=True)[backend]
    err, tol = fam.check(fn, case, DEVICE)  # correctness gate before timing
    assert err <= tol, f"{backend} is wrong on {case}: err {err:.2e} > {tol:.2e}"
    inputs = fam.make_inputs(case, DEVICE, requires_grad=fam.needs_grad(case))

    def run():
        fam.call(fn, inputs, case)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    key, scale = WORK[family]
    benchmark.extra_info.update(case=case, **{key: fam.work(case) / scale})
    benchmark.pedantic(run, warmup_rounds=1, rounds=5, iterations=1)
