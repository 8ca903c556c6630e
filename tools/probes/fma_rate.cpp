// How many cycles the VM gives this core right now, as FMA throughput: 10 independent chains of
// 256-bit FMAs (register-only), reported as the clock they would need at 2 FMAs per cycle (Zen 3,
// Intel since Haswell). Not part of the build. On a compute-bound kernel run, compare it with the
// value at another moment: a lower value means the VM got fewer cycles (steal, clock), which a
// memory copy timed beside the kernel does not show.
//
//   g++ -O3 -mavx2 -mfma tools/probes/fma_rate.cpp -o /tmp/fma_rate && /tmp/fma_rate
#include <immintrin.h>

#include <cstdio>
#include <ctime>

int main() {
  __m256 a[10];
  for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps(1.0f + i * 1e-7f);
  const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  const long n = 200000000;
  timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long k = 0; k < n; k++)
#pragma GCC unroll 10
    for (int i = 0; i < 10; i++) a[i] = _mm256_fmadd_ps(a[i], m, c);  // a[] must stay in registers
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  float x = 0;
  for (int i = 0; i < 10; i++) x += a[i][0];
  std::printf("%.2f G FMA instructions/s -> %.2f GHz at 2 FMAs per cycle (checksum %f)\n", n * 10 / s / 1e9,
              n * 10 / s / 2e9, x);
}
