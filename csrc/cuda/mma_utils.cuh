// Warp-level building blocks of the flash kernels (sm_80+): the m16n8k16 tensor-core MMA, ldmatrix and
// cp.async as inline PTX, plus conversions between fp32 accumulators and packed 16-bit operands.
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 (group) and t = lane % 4 (thread in group):
//   A (16x16, row major), 4 x b32:  a0 = A[g][2t..2t+1]    a1 = A[g+8][2t..2t+1]
//                                   a2 = A[g][2t+8..+9]    a3 = A[g+8][2t+8..+9]
//   B (16x8, "col"), 2 x b32:       b0 = B[2t..2t+1][g]    b1 = B[2t+8..+9][g]
//   C (16x8 fp32), 4 floats:        c0,c1 = C[g][2t..2t+1] c2,c3 = C[g+8][2t..2t+1]
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and lane l
// receives row l/4, columns 2(l%4)..+1 of each (with .trans: rows 2(l%4)..+1 of column l/4).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedattn::cuda {

template <typename T> struct MmaType;
template <> struct MmaType<__half> {
  __device__ static inline uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits: the lower column index
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static inline float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
};
template <> struct MmaType<__nv_bfloat16> {
  __device__ static inline uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static inline float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
};

#ifdef FUSEDATTN_CUDA_EMULATE
// tests/cuda_emu runs these kernels on the CPU (one OS thread per CUDA thread) to check their indexing
// without a GPU; it supplies the warp-level instructions below from the PTX ISA's definitions.
#include "cuda_emu_warp.h"
#else
// c += a * b for one 16x8x16 tile, fp32 accumulators.
template <typename T> __device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ inline void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ inline void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// 16-byte asynchronous global -> shared copy; valid == false writes 16 zero bytes and reads nothing
// (src-size 0), which is how out-of-range rows become zeros in the tiles.
__device__ inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(valid ? 16 : 0));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

#endif  // FUSEDATTN_CUDA_EMULATE

// Reductions over the 4 lanes of a quad (the lanes that hold one row of a C fragment).
__device__ inline float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ inline float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ inline float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ inline float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__host__ __device__ inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Copies a ROWS x D tile of 16-bit elements (row r at src + r * row_stride, contiguous along D) into
// shared memory with row pitch LDS elements, with cp.async. Rows >= rows_valid are zero-filled without
// reading global memory (`fallback` is a valid address to hand the instruction in that case).
template <int ROWS, int D, int LDS, int NTHREADS, typename T>
__device__ inline void load_tile_async(T* smem, const T* src, int64_t row_stride, int64_t rows_valid,
                                       const T* fallback, int tid) {
  constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
#pragma unroll
  for (int c = tid; c < ROWS * CHUNKS; c += NTHREADS) {
    const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
    const bool ok = r < rows_valid;
    cp_async_16(smem + r * LDS + col, ok ? src + r * row_stride + col : fallback, ok);
  }
}

// Is key j visible to query i? (see AttnFwdParams)
__device__ inline bool key_visible(int64_t i, int64_t j, int64_t Lk, int64_t off, int64_t wl, int64_t wr) {
  return j < Lk && (wl < 0 || j >= i + off - wl) && (wr < 0 || j <= i + off + wr);
}

}  // namespace fusedattn::cuda
