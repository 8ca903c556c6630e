"""Attention benchmark: fusedattn vs torch SDPA (each backend), FlexAttention and installed peers.

    python benchmarks/bench_attention.py --out benchmarks/results           # the full CPU/GPU table
    python benchmarks/bench_attention.py --quick                            # < 1 minute on 2 cores

Same as ``python -m fusedattn bench attention``; the cases, peers and FLOP formula live in
fusedattn/bench/attention.py, the method (timing, memory, correctness gate) in fusedattn/bench/core.py.
"""

import sys

from fusedattn.bench import main

if __name__ == "__main__":
    main(["attention", *sys.argv[1:]])
