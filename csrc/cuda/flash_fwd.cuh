// Flash attention forward on tensor cores (sm_80+), FlashAttention-2 structure:
//   * one CTA per (query block of BLOCK_M rows, q head, batch); each of its NWARPS warps owns 16 MT query rows,
//     so the softmax statistics of a row live in the registers of one quad and need no shared memory;
//   * Q stays in shared memory; K and V tiles of BLOCK_N keys stream through one buffer each with cp.async:
//     the copy of V_j overlaps S = Q K_j^T and the copy of K_{j+1} overlaps the softmax and O += P V_j
//     (FA2's flash_fwd_kernel.h does the same);
//   * S and O accumulate in fp32 registers (mma.sync m16n8k16); P is rounded to the input dtype and fed
//     back as the A operand of the next MMA straight from registers (the C and A fragment layouts line up);
//   * online softmax in base 2: scores are scaled by scale*log2(e) once, so exp(x) becomes exp2(x);
//   * a row that sees no key keeps m = -inf and l = 0 and writes out 0, lse -inf.
// Shared-memory rows are padded by 8 elements (16 bytes): the 8 row addresses of an ldmatrix then fall in
// 8 different 16-byte bank groups, so loads are conflict-free without a swizzle.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/mma_utils.cuh"
#include "cuda/params.h"

namespace fusedattn::cuda {

template <int D> struct FwdConfig {
  static constexpr int NWARPS = 4;
  // Each warp owns MT m16 row tiles: with MT = 2 one K / V fragment read from shared memory (ldmatrix) feeds
  // two MMAs, which halves the shared-memory traffic per FLOP (FA2's 128 x 64 tile on 4 warps). At D = 256
  // the output accumulator alone is 128 registers per thread, so there a warp owns one tile.
  static constexpr int MT = D <= 128 ? 2 : 1;
  static constexpr int BLOCK_M = 16 * MT * NWARPS;    // query rows per CTA
  static constexpr int BLOCK_N = D <= 64 ? 64 : 32;  // keys per tile (32 at D >= 128 keeps S + O in registers)
  static constexpr int LDS = D + 8;                   // shared-memory row pitch (elements)
  static constexpr int SMEM_BYTES = (BLOCK_M + 2 * BLOCK_N) * LDS * 2;  // Q, K, V tiles of 16-bit elements
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdConfig<D>::NWARPS * 32) attention_fwd_kernel(const AttnFwdParams p) {
  using Cfg = FwdConfig<D>;
  constexpr int NWARPS = Cfg::NWARPS, NTHREADS = NWARPS * 32, BLOCK_M = Cfg::BLOCK_M, BLOCK_N = Cfg::BLOCK_N,
                LDS = Cfg::LDS, MT = Cfg::MT;
  constexpr int NT = BLOCK_N / 8;  // n8 tiles of S per m16 tile
  constexpr int DT = D / 8;        // n8 tiles of O per m16 tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (BLOCK_M, LDS)
  T* sK = sQ + BLOCK_M * LDS;              // (BLOCK_N, LDS)
  T* sV = sK + BLOCK_N * LDS;              // (BLOCK_N, LDS)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int64_t m0 = int64_t(blockIdx.x) * BLOCK_M, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (p.Hq / p.Hkv);  // GQA: the kv head of this q head
  const int64_t Lq = p.Lq, Lk = p.Lk, off = p.diag_offset, wl = p.window_left, wr = p.window_right;
  const int64_t w0 = m0 + warp * 16 * MT;  // first query row of this warp

  const T* gQ = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
  const T* gK = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* gV = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  T* gO = static_cast<T*>(p.out) + ((b * p.Hq + h) * Lq) * D;
  float* gLse = p.lse + (b * p.Hq + h) * Lq;

  // Keys any row of this block can see: [k_lo, k_hi).
  const int64_t m_last = imin(m0 + BLOCK_M, Lq) - 1;
  const int64_t k_lo = wl < 0 ? 0 : imax(0, m0 + off - wl);
  const int64_t k_hi = wr < 0 ? Lk : imin(Lk, m_last + off + wr + 1);
  const int64_t nb_lo = k_lo / BLOCK_N, nb_hi = k_hi > k_lo ? (k_hi + BLOCK_N - 1) / BLOCK_N : nb_lo;

  // Row state of this thread: rows w0 + 16 mt + g and + 8 (r = 0, 1) for each of its m16 tiles mt.
  float acc_o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][i][e] = 0.f;
  float row_max[MT][2], row_sum[MT][2];  // max in log2 units (scores * scale * log2 e); sums quad-reduced at the end
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[mt][r] = -INFINITY;
      row_sum[mt][r] = 0.f;
    }
  const float scale_log2 = p.scale * LOG2E;

  if (nb_lo < nb_hi) {
    load_tile_async<BLOCK_M, D, LDS, NTHREADS>(sQ, gQ, p.q_stride[2], Lq - m0, static_cast<const T*>(p.q), tid);
    load_tile_async<BLOCK_N, D, LDS, NTHREADS>(sK, gK + nb_lo * BLOCK_N * p.k_stride[2], p.k_stride[2],
                                               Lk - nb_lo * BLOCK_N, static_cast<const T*>(p.k), tid);
    cp_async_commit();
  }

  const T* sQw = sQ + warp * 16 * MT * LDS;
  for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
    const int64_t n0 = nb * BLOCK_N;
    cp_async_wait<0>();  // K_nb (and Q) have landed ...
    __syncthreads();     // ... for every thread, and every warp is done reading V_{nb-1}
    load_tile_async<BLOCK_N, D, LDS, NTHREADS>(sV, gV + n0 * p.v_stride[2], p.v_stride[2], Lk - n0,
                                               static_cast<const T*>(p.v), tid);
    cp_async_commit();

    // S = Q K^T for this warp's 16 MT rows: MT x (16, BLOCK_N).
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], sQw + (mt * 16 + lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        // K rows are the n index of B = K^T: matrices (keys 0-7, d 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15).
        uint32_t bk[4];
        ldmatrix_x4(bk, sK + (n2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * n2], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * n2 + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    cp_async_wait<0>();  // V_nb has landed ...
    __syncthreads();     // ... and every warp is done reading K_nb
    if (nb + 1 < nb_hi) {
      load_tile_async<BLOCK_N, D, LDS, NTHREADS>(sK, gK + (n0 + BLOCK_N) * p.k_stride[2], p.k_stride[2],
                                                 Lk - n0 - BLOCK_N, static_cast<const T*>(p.k), tid);
      cp_async_commit();
    }

    // Scale into log2 units and mask; a tile strictly inside the band and the key range needs no mask.
    const bool need_mask = n0 + BLOCK_N > Lk || (wr >= 0 && n0 + BLOCK_N - 1 > m0 + off + wr) ||
                           (wl >= 0 && n0 < m0 + BLOCK_M - 1 + off - wl);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][nt][e] *= scale_log2;
          if (need_mask) {
            const int64_t i = w0 + mt * 16 + g + (e >= 2 ? 8 : 0), j = n0 + nt * 8 + 2 * t4 + (e & 1);
            if (!key_visible(i, j, Lk, off, wl, wr)) s[mt][nt][e] = -INFINITY;
          }
        }

    // Online softmax: new max, rescale the running sum and output, P = exp2(S - max).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = quad_max(mx);
        // A row with no visible key so far keeps max -inf; subtracting 0 instead avoids -inf - -inf = NaN.
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(row_max[mt][r] - m_use);  // 0 on the first visible tile (row_max = -inf)
        row_max[mt][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          s[mt][nt][2 * r] = exp2f(s[mt][nt][2 * r] - m_use);
          s[mt][nt][2 * r + 1] = exp2f(s[mt][nt][2 * r + 1] - m_use);
          sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          acc_o[mt][dt][2 * r] *= alpha;
          acc_o[mt][dt][2 * r + 1] *= alpha;
        }
      }

    // O += P V. P (16, BLOCK_N) as A fragments: k step kk covers S tiles 2kk (keys 0-7) and 2kk+1 (8-15).
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = MmaType<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = MmaType<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = MmaType<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = MmaType<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int d2 = 0; d2 < DT / 2; ++d2) {
        // B = V (keys x d) is row major in smem, so ldmatrix.trans: matrices (keys 0-7, d 0-7), (8-15, 0-7),
        // (0-7, 8-15), (8-15, 8-15) give b0, b1 of d tile 2 d2 and b0, b1 of d tile 2 d2 + 1.
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + d2 * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(acc_o[mt][2 * d2], a[mt], bv[0], bv[1]);
          mma_16816<T>(acc_o[mt][2 * d2 + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  // Normalize and store: out = O / l, lse = (max + log2 l) * ln 2; l = 0 (no visible key): out 0, lse -inf.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[mt][r]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int64_t i = w0 + mt * 16 + g + 8 * r;
      if (i < Lq) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          const uint32_t v = MmaType<T>::pack(acc_o[mt][dt][2 * r] * inv, acc_o[mt][dt][2 * r + 1] * inv);
          *reinterpret_cast<uint32_t*>(gO + i * D + dt * 8 + 2 * t4) = v;
        }
        if (t4 == 0) gLse[i] = l > 0.f ? (row_max[mt][r] + log2f(l)) * LN2 : -INFINITY;
      }
    }
}

#ifndef FUSEDATTN_CUDA_EMULATE  // the emulator (tests/cuda_emu) launches the kernels itself
template <typename T, int D> cudaError_t attention_fwd_launch(const AttnFwdParams& p, cudaStream_t stream) {
  using Cfg = FwdConfig<D>;
  auto kernel = attention_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM_BYTES);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.Lq + Cfg::BLOCK_M - 1) / Cfg::BLOCK_M), static_cast<unsigned>(p.Hq),
                  static_cast<unsigned>(p.B));
  kernel<<<grid, Cfg::NWARPS * 32, Cfg::SMEM_BYTES, stream>>>(p);
  return cudaGetLastError();
}

#endif

}  // namespace fusedattn::cuda
