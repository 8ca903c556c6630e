// Does this CPU keep a burst of software prefetches? (x86-64, one thread; not part of the build.)
//
//   g++ -O2 tools/probes/prefetch_drop.cpp -o /tmp/prefetch_drop
//   /tmp/prefetch_drop 0   # no prefetch: reading N cold lines
//   /tmp/prefetch_drop 1   # prefetcht0 of the N lines, ~50 us of waiting, then reading them
//   /tmp/prefetch_drop 2   # the same with prefetcht1
//
// For each N: the cycles the prefetch instructions took to issue and the cycles per line of the read.
// Lines that arrived read in a few cycles each; dropped prefetches read as slowly as mode 0.
// Results on the 2-core AMD EPYC (Zen 3) VM: benchmarks/results/README.md, "CPU decode".
#include <sys/mman.h>
#include <x86intrin.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

static inline void prefetch_t0(const char* p) { asm volatile("prefetcht0 %0" : : "m"(*p)); }
static inline void prefetch_t1(const char* p) { asm volatile("prefetcht1 %0" : : "m"(*p)); }

int main(int argc, char** argv) {
  const int mode = argc > 1 ? atoi(argv[1]) : 1;
  const size_t size = 256ull << 20, flush_size = 64ull << 20;
  char* data = static_cast<char*>(aligned_alloc(1 << 21, size));
  char* flush = static_cast<char*>(aligned_alloc(1 << 21, flush_size));
  madvise(data, size, MADV_HUGEPAGE);
  memset(data, 1, size);
  memset(flush, 1, flush_size);
  volatile long sink = 0;
  const int counts[] = {16, 32, 64, 128, 256, 512, 1024};
  for (int n : counts) {
    const int reps = 50;
    double issue = 0, read = 0;
    size_t off = 0;
    for (int r = 0; r < reps; ++r) {
      for (size_t i = 0; i < flush_size; i += 64) sink += flush[i];  // evict `data` from the caches
      const char* base = data + off;
      off = (off + (3u << 20)) % (size - (1u << 20));  // a fresh region each repeat
      const unsigned long long t0 = __rdtsc();
      for (int i = 0; i < n; ++i) {
        if (mode == 1) prefetch_t0(base + 64 * static_cast<size_t>(i));
        if (mode == 2) prefetch_t1(base + 64 * static_cast<size_t>(i));
      }
      const unsigned long long t1 = __rdtsc();
      while (__rdtsc() - t1 < 150000) {  // ~50 us at 3 GHz: far longer than a memory access
      }
      const unsigned long long t2 = __rdtsc();
      long s = 0;
      for (int i = 0; i < n; ++i) s += base[64 * static_cast<size_t>(i)];
      const unsigned long long t3 = __rdtsc();
      sink += s;
      issue += static_cast<double>(t1 - t0);
      read += static_cast<double>(t3 - t2);
    }
    printf("mode %d N %5d: issue %8.0f cycles (%.1f/line)  read %8.0f cycles (%.1f/line)\n", mode, n,
           issue / reps, issue / reps / n, read / reps, read / reps / n);
  }
  return static_cast<int>(sink & 0);
}
