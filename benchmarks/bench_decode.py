"""Decode benchmark: fusedattn.decode_attention vs torch SDPA on the same KV cache, as GB/s and as a
fraction of the copy bandwidth measured in the same run.

    python benchmarks/bench_decode.py --out benchmarks/results     # the full table (CPU: B {1, 8, 64}, Hq 32,
                                                                   # Hkv {32, 8}, D 128, L 512..32k, contiguous
                                                                   # and paged, bf16 and fp32)
    python benchmarks/bench_decode.py --quick                      # the issue's target case (also on a plain
                                                                   # torch tensor) and three more

Same as ``python -m fusedattn bench decode``; the cases, peers and byte formula live in
fusedattn/bench/decode.py, the method (timing, correctness gate) in fusedattn/bench/core.py.
"""

import sys

from fusedattn.bench import main

if __name__ == "__main__":
    main(["decode", *sys.argv[1:]])
