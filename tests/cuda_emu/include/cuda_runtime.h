// CPU stand-in for <cuda_runtime.h>, used only by the kernel emulator (tests/cuda_emu, FUSEDATTN_CUDA_EMULATE).
// A CUDA thread is an OS thread: threadIdx / blockIdx are thread_local, __syncthreads is a std::barrier over the
// CTA's threads, and warp-level operations exchange values through per-warp slots between two barrier phases.
// This checks the kernels' indexing, fragment bookkeeping and masking against the PTX ISA's definitions of the
// warp instructions; it says nothing about speed, and cp.async is synchronous here (races are left to
// compute-sanitizer --tool racecheck on a GPU).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 { uint32_t x, y, z, w; };
struct float2 { float x, y; };
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = void*;

namespace emu {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline thread_local int lane_id = 0, warp_id = 0;
inline std::barrier<>* cta_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline uint64_t warp_slots[32][32][8];  // [warp][lane][value]

// Every lane of the warp contributes N 64-bit values and receives all 32 lanes' values.
template <int N> inline void warp_gather(const uint64_t (&mine)[N], uint64_t (&all)[32][N]) {
  auto& bar = *warp_barriers[warp_id];
  for (int i = 0; i < N; ++i) warp_slots[warp_id][lane_id][i] = mine[i];
  bar.arrive_and_wait();
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < N; ++i) all[l][i] = warp_slots[warp_id][l][i];
  bar.arrive_and_wait();  // nobody overwrites the slots before everyone has read them
}
}  // namespace emu

#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define blockDim emu::bDim
#define gridDim emu::gDim

inline void __syncthreads() { emu::cta_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barriers[emu::warp_id]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int o) {
  uint64_t mine[1];
  uint32_t u;
  std::memcpy(&u, &x, 4);
  mine[0] = u;
  uint64_t all[32][1];
  emu::warp_gather(mine, all);
  const uint32_t v = static_cast<uint32_t>(all[emu::lane_id ^ o][0]);
  float r;
  std::memcpy(&r, &v, 4);
  return r;
}
