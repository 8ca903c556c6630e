// Cycles per key x kv head of the CPU decode kernel, called directly (no Python, no op
// dispatch): for A/B runs of kernel edits. With two builds run in turn, the per-round minima
// resolve 1-2% on this noisy VM (timing through Python: ~10%); the VM's phases still move both
// by up to 50%, so compare within a round. Not part of the build. From the repository root:
//
//   TI=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
//   c++ -O3 -std=gnu++20 -ffp-contract=fast -fno-math-errno -fno-trapping-math \
//       -mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt -fopenmp -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 \
//       -I$TI/include -I$TI/include/torch/csrc/api/include -Icsrc \
//       tools/probes/decode_cycles.cpp -o /tmp/decode_cycles -L$TI/lib -ltorch_cpu -lc10 -Wl,-rpath,$TI/lib
//   /tmp/decode_cycles B L ITERS [KV_HEADS_PER_TASK]      (NT=2 in the environment: two threads)
//
// Hq=32, Hkv=8, D=128, one query row, contiguous cache allocated as fusedattn.zeros_kv_cache does
// (2 MiB-aligned, advised to use transparent huge pages; SMALL_PAGES=1 in the environment: 4 KiB
// pages: 128-130 vs 121-123 ticks at B=8 L=4096, one thread); bf16, or fp16 /
// fp32 with DT=fp16 / DT=fp32 in the environment. Add
// -DKERNEL_SRC='"/path/to/edited/decode_kernel.cpp"' to time an edited copy against this one.
// Prints the minimum and median over 15 timings of ITERS calls: TSC ticks and ns per key x kv
// head per thread (the TSC rate is measured against steady_clock). B=8 L=256 keeps the cache in L3
// (compute), B=8 L=4096 streams it from DRAM. Results: benchmarks/results/README.md, "CPU decode".
#ifndef KERNEL_SRC
#define KERNEL_SRC "cpu/decode_kernel.cpp"
#endif
#include KERNEL_SRC

#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <x86intrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using namespace fusedattn::cpu;

// A cache tensor's memory: 2 MiB-aligned and advised to use huge pages, as fusedattn.zeros_kv_cache.
template <typename T>
struct CacheBuffer {
  int64_t n;
  T* ptr;
  explicit CacheBuffer(int64_t count) : n(count) {
    const size_t huge = size_t(2) << 20, bytes = (n * sizeof(T) + huge - 1) / huge * huge;
    ptr = static_cast<T*>(std::aligned_alloc(huge, bytes));
    if (!ptr) {
      std::fprintf(stderr, "out of memory allocating %zu bytes\n", bytes);
      std::exit(1);
    }
    if (!std::getenv("SMALL_PAGES")) madvise(ptr, bytes, MADV_HUGEPAGE);
  }
  ~CacheBuffer() { std::free(ptr); }
  CacheBuffer(const CacheBuffer&) = delete;
  CacheBuffer& operator=(const CacheBuffer&) = delete;
  T* data() const { return ptr; }
};

template <typename T>
int run(InDtype dtype, int argc, char** argv) {
  const int64_t B = std::atoll(argv[1]), L = std::atoll(argv[2]), iters = std::atoll(argv[3]);
  const int64_t Hq = 32, Hkv = 8, D = 128;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<T> q(B * Hq * D), out(B * Hq * D);
  CacheBuffer<T> k(B * L * Hkv * D), v(B * L * Hkv * D);
  for (auto& x : q) x = normal(gen);
  for (int64_t i = 0; i < k.n; ++i) k.data()[i] = normal(gen), v.data()[i] = normal(gen);
  std::vector<float> lse(B * Hq);
  std::vector<int32_t> seqlens(B, static_cast<int32_t>(L));

  DecodeParams p{};
  p.dtype = dtype;
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.Lq = 1, p.D = D, p.Dv = D;
  const int64_t qs[4] = {Hq * D, Hq * D, D, 1}, cs[4] = {L * Hkv * D, Hkv * D, D, 1};
  p.q = q.data();
  std::copy(qs, qs + 4, p.q_stride);
  p.k_cache = k.data();
  std::copy(cs, cs + 4, p.k_stride);
  p.v_cache = v.data();
  std::copy(cs, cs + 4, p.v_stride);
  p.cache_seqlens = seqlens.data();
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.window_left = p.window_right = -1;
  p.num_splits = 1;
  p.kv_heads_per_task = argc > 4 ? std::atoll(argv[4]) : Hkv;
  p.out = out.data();
  p.lse = lse.data();

  const auto w0 = std::chrono::steady_clock::now();
  const uint64_t c0 = __rdtsc();
  std::vector<double> ticks;
  for (int rep = 0; rep < 15; ++rep) {
    const uint64_t t0 = __rdtsc();
    for (int64_t i = 0; i < iters; ++i) AVX2::decode_fwd_kernel(p);
    ticks.push_back(double(__rdtsc() - t0) * at::get_num_threads() / iters / (B * L * Hkv));
  }
  const double ghz = (__rdtsc() - c0) / std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - w0).count();
  std::sort(ticks.begin(), ticks.end());
  std::printf("B=%ld L=%ld threads=%d: %.1f TSC ticks per key x kv head per thread (min), %.1f (median); "
              "%.1f ns min at TSC %.2f GHz; out[5]=%g\n",
              long(B), long(L), at::get_num_threads(), ticks[0], ticks[7], ticks[0] / ghz, ghz, float(out[5]));
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s B L ITERS [KV_HEADS_PER_TASK]\n", argv[0]);
    return 2;
  }
  at::set_num_threads(std::getenv("NT") ? std::atoi(std::getenv("NT")) : 1);
  const std::string dt = std::getenv("DT") ? std::getenv("DT") : "bf16";
  if (dt == "fp32") return run<float>(InDtype::kFloat32, argc, argv);
  if (dt == "fp16") return run<c10::Half>(InDtype::kFloat16, argc, argv);
  return run<c10::BFloat16>(InDtype::kBFloat16, argc, argv);
}
