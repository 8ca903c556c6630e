"""Model benchmark: prefill and decode tokens/s of our GPT (fusedattn.transformer, KV cache through
fusedattn.decode_attention) vs transformers' GPT2LMHeadModel with eager and with sdpa attention, same GPT-2
weights and dtype, with the peak extra memory of one call.

    python benchmarks/bench_model.py --out benchmarks/results     # GPT-2 124M shapes: B {1, 8}, prompt
                                                                  # P {128, 1024}, N = 32 decode steps,
                                                                  # fp32 + bf16 on the CPU (bf16 + fp16 on CUDA)
    python benchmarks/bench_model.py --quick                      # a 2-layer model, two cases (a smoke test)

Same as ``python -m fusedattn bench model``; the cases, peers and tokens/s formula live in
fusedattn/bench/model.py, the method (timing, correctness gate, memory) in fusedattn/bench/core.py.
Needs transformers.
"""

import sys

from fusedattn.bench import main

if __name__ == "__main__":
    main(["model", *sys.argv[1:]])
