// Flash attention backward on tensor cores (sm_80+). With P = exp(scale * Q K^T - lse) (recomputed from the
// forward's lse, FA2 style) and dS = P o (dO V^T - delta), delta = rowsum(dO o O) - dlse:
//   dV = P^T dO,   dK = scale * dS^T Q,   dQ = scale * dS K.
// Two kernels, both deterministic (no atomics) because every output row has exactly one owner warp:
//   * attention_bwd_dkdv_kernel: one CTA per (key block of BLOCK_N keys, kv head, batch); each warp owns 16
//     keys and keeps their dK, dV in fp32 registers while the CTA walks over every query block of every q head
//     of the GQA group that can see them (so the group sum happens in registers, not in a scratch tensor).
//     It computes the transposed tiles S^T = K Q^T and dP^T = V dO^T, so that P^T and dS^T come out of the
//     MMA in the C layout that feeds the next MMA as its A operand. At D = 256, dK and dV together do not fit
//     in registers: the kernel runs twice, once for dV and once for dK.
//   * attention_bwd_dq_kernel: one CTA per (query block, q head, batch), the forward's structure: each warp
//     owns 16 or 32 query rows, walks over the visible key blocks and accumulates dQ in registers. This recomputes
//     S and dP once more (FA2 instead adds dQ with fp32 atomics: faster, but not deterministic).
// Q / dO (dkdv kernel) and K / V (dq kernel) tiles are double buffered: the copy of the next tile overlaps the
// MMAs on the current one. Layout notes for ldmatrix and the fragments are in mma_utils.cuh and flash_fwd.cuh.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/mma_utils.cuh"
#include "cuda/params.h"

namespace fusedattn::cuda {

template <int D> struct BwdConfig {
  static constexpr int NWARPS = 4;
  static constexpr int LDS = D + 8;
  // dK/dV kernel: BLOCK_N keys per CTA (16 per warp), query tiles of BLOCK_M rows, two stages of Q, dO.
  static constexpr int KV_BLOCK_N = 16 * NWARPS;
  static constexpr int KV_BLOCK_M = D <= 64 ? 64 : 32;
  static constexpr bool KV_TWO_PASS = D > 128;  // dV and dK in separate launches (register budget)
  static constexpr int KV_SMEM_BYTES = (2 * KV_BLOCK_N + 4 * KV_BLOCK_M) * LDS * 2 + 4 * KV_BLOCK_M * 4;
  // dQ kernel: BLOCK_M query rows per CTA (16 Q_MT per warp), two stages of K, V tiles of BLOCK_N keys. With
  // Q_MT = 2 each K / V fragment read from shared memory feeds two MMAs (as in the forward).
  static constexpr int Q_MT = D <= 128 ? 2 : 1;
  static constexpr int Q_BLOCK_M = 16 * Q_MT * NWARPS;
  static constexpr int Q_BLOCK_N = D <= 64 ? 64 : 32;
  static constexpr int Q_SMEM_BYTES = (2 * Q_BLOCK_M + 4 * Q_BLOCK_N) * LDS * 2;
};

// acc (16, 8 NT) += A (16 rows of sA from row 0, k = D) * B^T (8 NT rows of sB) -- the "S = Q K^T" product of
// a warp, with both operands row major in shared memory along D.
template <typename T, int D, int LDS, int NT>
__device__ inline void warp_gemm_abt(float (&acc)[NT][4], const T* sA, const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, sA + (lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int n2 = 0; n2 < NT / 2; ++n2) {
      uint32_t bk[4];
      ldmatrix_x4(bk, sB + (n2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
      mma_16816<T>(acc[2 * n2], a, bk[0], bk[1]);
      mma_16816<T>(acc[2 * n2 + 1], a, bk[2], bk[3]);
    }
  }
}

// acc (16, D) += P (16, 8 NT, fp32 C fragments, rounded to T) * sB (8 NT rows, D columns, row major) -- the
// "O += P V" product of a warp.
template <typename T, int D, int LDS, int NT>
__device__ inline void warp_gemm_pb(float (&acc)[D / 8][4], const float (&pm)[NT][4], const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    uint32_t a[4];
    a[0] = MmaType<T>::pack(pm[2 * kk][0], pm[2 * kk][1]);
    a[1] = MmaType<T>::pack(pm[2 * kk][2], pm[2 * kk][3]);
    a[2] = MmaType<T>::pack(pm[2 * kk + 1][0], pm[2 * kk + 1][1]);
    a[3] = MmaType<T>::pack(pm[2 * kk + 1][2], pm[2 * kk + 1][3]);
#pragma unroll
    for (int d2 = 0; d2 < D / 16; ++d2) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, sB + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + d2 * 16 + (lane >> 4) * 8);
      mma_16816<T>(acc[2 * d2], a, bv[0], bv[1]);
      mma_16816<T>(acc[2 * d2 + 1], a, bv[2], bv[3]);
    }
  }
}

// The same two products for MT m16 tiles of A at once (rows 16 mt.. of sA): each B fragment is read from
// shared memory once and used by MT MMAs.
template <typename T, int D, int LDS, int NT, int MT>
__device__ inline void warp_gemm_abt_mt(float (&acc)[MT][NT][4], const T* sA, const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], sA + (mt * 16 + lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int n2 = 0; n2 < NT / 2; ++n2) {
      uint32_t bk[4];
      ldmatrix_x4(bk, sB + (n2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * n2], a[mt], bk[0], bk[1]);
        mma_16816<T>(acc[mt][2 * n2 + 1], a[mt], bk[2], bk[3]);
      }
    }
  }
}

template <typename T, int D, int LDS, int NT, int MT>
__device__ inline void warp_gemm_pb_mt(float (&acc)[MT][D / 8][4], const float (&pm)[MT][NT][4], const T* sB,
                                       int lane) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = MmaType<T>::pack(pm[mt][2 * kk][0], pm[mt][2 * kk][1]);
      a[mt][1] = MmaType<T>::pack(pm[mt][2 * kk][2], pm[mt][2 * kk][3]);
      a[mt][2] = MmaType<T>::pack(pm[mt][2 * kk + 1][0], pm[mt][2 * kk + 1][1]);
      a[mt][3] = MmaType<T>::pack(pm[mt][2 * kk + 1][2], pm[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int d2 = 0; d2 < D / 16; ++d2) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, sB + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + d2 * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * d2], a[mt], bv[0], bv[1]);
        mma_16816<T>(acc[mt][2 * d2 + 1], a[mt], bv[2], bv[3]);
      }
    }
  }
}

template <int M, int N> __device__ inline void zero(float (&x)[M][N][4]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) x[m][i][e] = 0.f;
}

template <int N> __device__ inline void zero(float (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[i][e] = 0.f;
}

// lse in log2 units, with a row that saw no key (lse = -inf) mapped to +inf so that its P = exp2(s - lse) is 0.
__device__ inline float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * LOG2E; }

template <typename T, int D, bool DO_DK, bool DO_DV>
__global__ void __launch_bounds__(BwdConfig<D>::NWARPS * 32) attention_bwd_dkdv_kernel(const AttnBwdParams p) {
  using Cfg = BwdConfig<D>;
  constexpr int NTHREADS = Cfg::NWARPS * 32, BLOCK_N = Cfg::KV_BLOCK_N, BLOCK_M = Cfg::KV_BLOCK_M, LDS = Cfg::LDS;
  constexpr int NT = BLOCK_M / 8, DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // (BLOCK_N, LDS)
  T* sV = sK + BLOCK_N * LDS;              // (BLOCK_N, LDS)
  T* sQ = sV + BLOCK_N * LDS;              // 2 stages of (BLOCK_M, LDS)
  T* sdO = sQ + 2 * BLOCK_M * LDS;         // 2 stages of (BLOCK_M, LDS)
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BLOCK_M * LDS);  // 2 stages of BLOCK_M (log2 units)
  float* sDelta = sLse + 2 * BLOCK_M;                               // 2 stages of BLOCK_M

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int64_t n0 = int64_t(blockIdx.x) * BLOCK_N, hk = blockIdx.y, b = blockIdx.z;
  const int64_t G = p.Hq / p.Hkv;
  const int64_t Lq = p.Lq, Lk = p.Lk, off = p.diag_offset, wl = p.window_left, wr = p.window_right;
  const T* Qbase = static_cast<const T*>(p.q);
  const T* dObase = static_cast<const T*>(p.dout);

  // Queries that see at least one key of this block: [i_lo, i_hi).
  const int64_t n_last = imin(n0 + BLOCK_N, Lk) - 1;
  const int64_t i_lo = wr < 0 ? 0 : imax(0, n0 - off - wr);
  const int64_t i_hi = wl < 0 ? Lq : imin(Lq, n_last - off + wl + 1);
  const int64_t mb_lo = i_lo / BLOCK_M, nmb = i_hi > i_lo ? (i_hi + BLOCK_M - 1) / BLOCK_M - mb_lo : 0;
  const int64_t iters = nmb * G;  // (q head of the group, query block) pairs

  float acc_dk[DT][4], acc_dv[DT][4];
  zero(acc_dk);
  zero(acc_dv);

  // Issues the copies of iteration `it` into `stage`: Q, dO tiles (cp.async) and lse, delta (plain stores).
  auto load_iter = [&](int64_t it, int stage) {
    const int64_t h = hk * G + it / nmb, m0 = (mb_lo + it % nmb) * BLOCK_M;
    load_tile_async<BLOCK_M, D, LDS, NTHREADS>(sQ + stage * BLOCK_M * LDS,
                                               Qbase + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2],
                                               p.q_stride[2], Lq - m0, Qbase, tid);
    load_tile_async<BLOCK_M, D, LDS, NTHREADS>(
        sdO + stage * BLOCK_M * LDS, dObase + b * p.dout_stride[0] + h * p.dout_stride[1] + m0 * p.dout_stride[2],
        p.dout_stride[2], Lq - m0, dObase, tid);
    for (int r = tid; r < BLOCK_M; r += NTHREADS) {
      const int64_t i = m0 + r, row = (b * p.Hq + h) * Lq + i;
      sLse[stage * BLOCK_M + r] = i < Lq ? lse_log2(p.lse[row]) : INFINITY;  // rows past Lq: P = 0
      sDelta[stage * BLOCK_M + r] = i < Lq ? p.delta[row] : 0.f;
    }
  };

  if (iters > 0) {
    const T* gK = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + n0 * p.k_stride[2];
    const T* gV = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + n0 * p.v_stride[2];
    load_tile_async<BLOCK_N, D, LDS, NTHREADS>(sK, gK, p.k_stride[2], Lk - n0, static_cast<const T*>(p.k), tid);
    load_tile_async<BLOCK_N, D, LDS, NTHREADS>(sV, gV, p.v_stride[2], Lk - n0, static_cast<const T*>(p.v), tid);
    load_iter(0, 0);
    cp_async_commit();
  }

  const float scale_log2 = p.scale * LOG2E;
  const T* sKw = sK + warp * 16 * LDS;
  const T* sVw = sV + warp * 16 * LDS;
  for (int64_t it = 0; it < iters; ++it) {
    const int stage = it & 1;
    if (it + 1 < iters) {
      load_iter(it + 1, stage ^ 1);  // stage ^ 1 was last read in iteration it - 1, before its closing barrier
      cp_async_commit();
      cp_async_wait<1>();  // everything but the copies just issued has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t m0 = (mb_lo + it % nmb) * BLOCK_M;
    const T* sQs = sQ + stage * BLOCK_M * LDS;
    const T* sdOs = sdO + stage * BLOCK_M * LDS;
    const float* lse_s = sLse + stage * BLOCK_M;
    const float* delta_s = sDelta + stage * BLOCK_M;

    // S^T = K_w Q^T: (16 keys, BLOCK_M queries), then P^T = exp2(S^T scale log2 e - lse).
    float pt[NT][4];
    zero(pt);
    warp_gemm_abt<T, D, LDS, NT>(pt, sKw, sQs, lane);
    const bool need_mask = n0 + BLOCK_N > Lk || m0 + BLOCK_M > Lq ||
                           (wr >= 0 && n0 + BLOCK_N - 1 > m0 + off + wr) ||
                           (wl >= 0 && n0 < m0 + BLOCK_M - 1 + off - wl);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = nt * 8 + 2 * t4 + (e & 1);  // query column within the tile
        float s = pt[nt][e] * scale_log2;
        if (need_mask) {
          const int64_t j = n0 + warp * 16 + g + (e >= 2 ? 8 : 0), i = m0 + c;
          if (i >= Lq || !key_visible(i, j, Lk, off, wl, wr)) s = -INFINITY;
        }
        pt[nt][e] = exp2f(s - lse_s[c]);
      }

    if constexpr (DO_DV) warp_gemm_pb<T, D, LDS, NT>(acc_dv, pt, sdOs, lane);  // dV += P^T dO

    if constexpr (DO_DK) {
      // dP^T = V_w dO^T: (16 keys, BLOCK_M queries); dS^T = P^T o (dP^T - delta); dK += dS^T Q.
      float dst[NT][4];
      zero(dst);
      warp_gemm_abt<T, D, LDS, NT>(dst, sVw, sdOs, lane);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[nt][e] = pt[nt][e] * (dst[nt][e] - delta_s[nt * 8 + 2 * t4 + (e & 1)]);
      warp_gemm_pb<T, D, LDS, NT>(acc_dk, dst, sQs, lane);
    }
    __syncthreads();  // every warp is done with `stage` before iteration it + 1 refills it
  }

  // Store this warp's 16 rows of dK (times scale) and dV; keys past Lk are not stored.
  const int64_t kv_row0 = ((b * p.Hkv + hk) * Lk) * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = n0 + warp * 16 + g + 8 * r;
    if (j >= Lk) continue;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int64_t o = kv_row0 + j * D + dt * 8 + 2 * t4;
      if constexpr (DO_DK)
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dk) + o) =
            MmaType<T>::pack(acc_dk[dt][2 * r] * p.scale, acc_dk[dt][2 * r + 1] * p.scale);
      if constexpr (DO_DV)
        *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dv) + o) =
            MmaType<T>::pack(acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdConfig<D>::NWARPS * 32) attention_bwd_dq_kernel(const AttnBwdParams p) {
  using Cfg = BwdConfig<D>;
  constexpr int NTHREADS = Cfg::NWARPS * 32, BLOCK_M = Cfg::Q_BLOCK_M, BLOCK_N = Cfg::Q_BLOCK_N, LDS = Cfg::LDS;
  constexpr int MT = Cfg::Q_MT, NT = BLOCK_N / 8, DT = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (BLOCK_M, LDS)
  T* sdO = sQ + BLOCK_M * LDS;             // (BLOCK_M, LDS)
  T* sK = sdO + BLOCK_M * LDS;             // 2 stages of (BLOCK_N, LDS)
  T* sV = sK + 2 * BLOCK_N * LDS;          // 2 stages of (BLOCK_N, LDS)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int64_t m0 = int64_t(blockIdx.x) * BLOCK_M, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t Lq = p.Lq, Lk = p.Lk, off = p.diag_offset, wl = p.window_left, wr = p.window_right;
  const int64_t w0 = m0 + warp * 16 * MT;  // first query row of this warp
  const T* gK = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* gV = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];

  const int64_t m_last = imin(m0 + BLOCK_M, Lq) - 1;
  const int64_t k_lo = wl < 0 ? 0 : imax(0, m0 + off - wl);
  const int64_t k_hi = wr < 0 ? Lk : imin(Lk, m_last + off + wr + 1);
  const int64_t nb_lo = k_lo / BLOCK_N, nb_hi = k_hi > k_lo ? (k_hi + BLOCK_N - 1) / BLOCK_N : nb_lo;

  // This thread's rows: w0 + 16 mt + g and + 8.
  float row_lse[MT][2], row_delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = w0 + mt * 16 + g + 8 * r, row = (b * p.Hq + h) * Lq + i;
      row_lse[mt][r] = i < Lq ? lse_log2(p.lse[row]) : INFINITY;
      row_delta[mt][r] = i < Lq ? p.delta[row] : 0.f;
    }
  float acc_dq[MT][DT][4];
  zero(acc_dq);

  auto load_kv = [&](int64_t nb, int stage) {
    const int64_t n0 = nb * BLOCK_N;
    load_tile_async<BLOCK_N, D, LDS, NTHREADS>(sK + stage * BLOCK_N * LDS, gK + n0 * p.k_stride[2], p.k_stride[2],
                                               Lk - n0, static_cast<const T*>(p.k), tid);
    load_tile_async<BLOCK_N, D, LDS, NTHREADS>(sV + stage * BLOCK_N * LDS, gV + n0 * p.v_stride[2], p.v_stride[2],
                                               Lk - n0, static_cast<const T*>(p.v), tid);
  };
  if (nb_lo < nb_hi) {
    const T* Qb = static_cast<const T*>(p.q);
    const T* dOb = static_cast<const T*>(p.dout);
    load_tile_async<BLOCK_M, D, LDS, NTHREADS>(sQ, Qb + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2],
                                               p.q_stride[2], Lq - m0, Qb, tid);
    load_tile_async<BLOCK_M, D, LDS, NTHREADS>(
        sdO, dOb + b * p.dout_stride[0] + h * p.dout_stride[1] + m0 * p.dout_stride[2], p.dout_stride[2], Lq - m0,
        dOb, tid);
    load_kv(nb_lo, 0);
    cp_async_commit();
  }

  const float scale_log2 = p.scale * LOG2E;
  const T* sQw = sQ + warp * 16 * MT * LDS;
  const T* sdOw = sdO + warp * 16 * MT * LDS;
  for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
    const int stage = (nb - nb_lo) & 1;
    if (nb + 1 < nb_hi) {
      load_kv(nb + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t n0 = nb * BLOCK_N;
    const T* sKs = sK + stage * BLOCK_N * LDS;
    const T* sVs = sV + stage * BLOCK_N * LDS;

    float pm[MT][NT][4], ds[MT][NT][4];
    zero(pm);
    zero(ds);
    warp_gemm_abt_mt<T, D, LDS, NT, MT>(pm, sQw, sKs, lane);   // S = Q K^T
    warp_gemm_abt_mt<T, D, LDS, NT, MT>(ds, sdOw, sVs, lane);  // dP = dO V^T
    const bool need_mask = n0 + BLOCK_N > Lk || (wr >= 0 && n0 + BLOCK_N - 1 > m0 + off + wr) ||
                           (wl >= 0 && n0 < m0 + BLOCK_M - 1 + off - wl);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >= 2 ? 1 : 0;
          float sc = pm[mt][nt][e] * scale_log2;
          if (need_mask) {
            const int64_t i = w0 + mt * 16 + g + 8 * r, j = n0 + nt * 8 + 2 * t4 + (e & 1);
            if (!key_visible(i, j, Lk, off, wl, wr)) sc = -INFINITY;
          }
          const float pv = exp2f(sc - row_lse[mt][r]);
          ds[mt][nt][e] = pv * (ds[mt][nt][e] - row_delta[mt][r]);  // dS = P o (dP - delta)
        }
    warp_gemm_pb_mt<T, D, LDS, NT, MT>(acc_dq, ds, sKs, lane);  // dQ += dS K
    __syncthreads();
  }

  T* gdQ = static_cast<T*>(p.dq) + ((b * p.Hq + h) * Lq) * D;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = w0 + mt * 16 + g + 8 * r;
      if (i >= Lq) continue;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(gdQ + i * D + dt * 8 + 2 * t4) =
            MmaType<T>::pack(acc_dq[mt][dt][2 * r] * p.scale, acc_dq[mt][dt][2 * r + 1] * p.scale);
    }
}

#ifndef FUSEDATTN_CUDA_EMULATE  // the emulator (tests/cuda_emu) launches the kernels itself
template <typename Kernel>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream,
                             const AttnBwdParams& p) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D> cudaError_t attention_bwd_launch(const AttnBwdParams& p, cudaStream_t stream) {
  using Cfg = BwdConfig<D>;
  const int threads = Cfg::NWARPS * 32;
  const dim3 grid_kv(static_cast<unsigned>((p.Lk + Cfg::KV_BLOCK_N - 1) / Cfg::KV_BLOCK_N),
                     static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));
  cudaError_t err;
  if constexpr (Cfg::KV_TWO_PASS) {
    err = launch_with_smem(attention_bwd_dkdv_kernel<T, D, false, true>, grid_kv, threads, Cfg::KV_SMEM_BYTES,
                           stream, p);
    if (err != cudaSuccess) return err;
    err = launch_with_smem(attention_bwd_dkdv_kernel<T, D, true, false>, grid_kv, threads, Cfg::KV_SMEM_BYTES,
                           stream, p);
  } else {
    err = launch_with_smem(attention_bwd_dkdv_kernel<T, D, true, true>, grid_kv, threads, Cfg::KV_SMEM_BYTES,
                           stream, p);
  }
  if (err != cudaSuccess) return err;
  const dim3 grid_q(static_cast<unsigned>((p.Lq + Cfg::Q_BLOCK_M - 1) / Cfg::Q_BLOCK_M), static_cast<unsigned>(p.Hq),
                    static_cast<unsigned>(p.B));
  return launch_with_smem(attention_bwd_dq_kernel<T, D>, grid_q, threads, Cfg::Q_SMEM_BYTES, stream, p);
}

#endif

}  // namespace fusedattn::cuda
