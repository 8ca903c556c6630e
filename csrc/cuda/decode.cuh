// KV-cache decoding on the GPU: split-KV attention over a contiguous or paged cache, the semantics of
// csrc/cpu/decode.h (see DecodeParams in params.h). Decoding reads every cached key and value once for a
// handful of query rows, so it is bound by memory bandwidth, not by the tensor cores; the kernel is plain
// fp32 CUDA-core arithmetic organized around the reads:
//   * one CTA per (key-range split, chunk of DECODE_ROWS_PER_CTA query rows, kv head, sequence). All query
//     rows of a kv head (Lq x the GQA group) share each K / V tile it loads, so GQA costs no extra traffic;
//   * K / V tiles of BLOCK_N keys go through shared memory in two cp.async stages (the next tile's copy
//     overlaps the current one's arithmetic); each key's address is resolved through the block table, so
//     any page size works and pages need not be contiguous;
//   * per query row, one warp: lane l scores keys l, l + 32, ... (a 16-byte-vector dot product along D),
//     the warp agrees on the tile maximum, and then lane l accumulates output dims [l D/32, (l+1) D/32);
//   * each split writes a normalized partial output and its lse (fp32); decode_combine_kernel merges them
//     with the log-sum-exp rule, as merge_attention_states does for two states.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/mma_utils.cuh"
#include "cuda/params.h"

namespace fusedattn::cuda {

template <int D> struct DecodeConfig {
  static constexpr int NWARPS = 4;
  static constexpr int ROWS_PER_CTA = DECODE_ROWS_PER_CTA;
  static constexpr int ROWS_PER_WARP = ROWS_PER_CTA / NWARPS;
  static constexpr int BLOCK_N = D <= 128 ? 64 : 32;  // keys per tile
  static constexpr int KPL = BLOCK_N / 32;            // keys scored per lane
  static constexpr int EPL = D / 32;                  // output dims per lane
  static constexpr int LDS = D + 8;                   // 16-byte row padding: conflict-free 16-byte reads
  static constexpr int SMEM_BYTES = (ROWS_PER_CTA + 4 * BLOCK_N) * LDS * 2 + NWARPS * BLOCK_N * 4;
};

// Where key (or value) j of sequence b, kv head hk lives, or null when the index tensors point outside the
// cache (the kernel then reads zeros instead of memory it does not own).
template <typename T>
__device__ inline const T* cache_row(const DecodeParams& p, const T* cache, const int64_t* stride, int64_t b,
                                     int64_t hk, int64_t j) {
  int64_t first, second;
  if (p.block_table != nullptr) {
    // 32-bit division (the binding checks capacity < 2^31): a 64-bit one costs several times more.
    const uint32_t jj = static_cast<uint32_t>(j), ps = static_cast<uint32_t>(p.page_size);
    first = p.block_table[b * p.max_blocks + jj / ps];
    second = jj % ps;
  } else {
    first = p.cache_batch_idx != nullptr ? p.cache_batch_idx[b] : b;
    second = j;
  }
  if (first < 0 || first >= p.cache_rows) return nullptr;
  return cache + first * stride[0] + second * stride[1] + hk * stride[2];
}

// Keys of sequence b after the append, clamped to what the cache can hold.
__device__ inline int64_t decode_seqlen(const DecodeParams& p, int64_t b) {
  const int64_t cached = imax(0, p.cache_seqlens[b]);
  return imin(cached + p.Lnew, p.capacity);
}

template <typename T, int D> __global__ void decode_append_kernel(const DecodeParams p) {
  const int64_t n = p.B * p.Lnew * p.Hkv * D;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < n; x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = x % D, h = (x / D) % p.Hkv, t = (x / (D * p.Hkv)) % p.Lnew, b = x / (D * p.Hkv * p.Lnew);
    const int64_t pos = imax(0, p.cache_seqlens[b]) + t;
    if (pos >= p.capacity) continue;
    T* kc = const_cast<T*>(cache_row(p, static_cast<const T*>(p.k_cache), p.k_stride, b, h, pos));
    T* vc = const_cast<T*>(cache_row(p, static_cast<const T*>(p.v_cache), p.v_stride, b, h, pos));
    if (kc == nullptr) continue;
    kc[d] = static_cast<const T*>(p.k_new)[b * p.kn_stride[0] + t * p.kn_stride[1] + h * p.kn_stride[2] +
                                           d * p.kn_stride[3]];
    vc[d] = static_cast<const T*>(p.v_new)[b * p.vn_stride[0] + t * p.vn_stride[1] + h * p.vn_stride[2] +
                                           d * p.vn_stride[3]];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(DecodeConfig<D>::NWARPS * 32) decode_split_kv_kernel(const DecodeParams p) {
  using Cfg = DecodeConfig<D>;
  constexpr int NWARPS = Cfg::NWARPS, NTHREADS = NWARPS * 32, BLOCK_N = Cfg::BLOCK_N, LDS = Cfg::LDS;
  constexpr int RPC = Cfg::ROWS_PER_CTA, RPW = Cfg::ROWS_PER_WARP, KPL = Cfg::KPL, EPL = Cfg::EPL;
  constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (RPC, LDS)
  T* sK = sQ + RPC * LDS;                  // 2 stages of (BLOCK_N, LDS)
  T* sV = sK + 2 * BLOCK_N * LDS;          // 2 stages of (BLOCK_N, LDS)
  float* sP = reinterpret_cast<float*>(sV + 2 * BLOCK_N * LDS);  // (NWARPS, BLOCK_N) probabilities

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t S = p.num_splits, split = blockIdx.x % S, row0 = (blockIdx.x / S) * RPC;
  const int64_t hk = blockIdx.y, b = blockIdx.z;
  const int64_t G = p.Hq / p.Hkv, R = p.Lq * G;  // query rows of this kv head: row r = (i = r / G, hq = hk G + r % G)
  const int64_t Lq = p.Lq, wl = p.window_left, wr = p.window_right;
  const int64_t Lk = decode_seqlen(p, b), off = Lk - Lq;  // bottom-right: query i sits at position Lk - Lq + i
  // Band of query i: keys [lo(i), hi(i)); the keys some row of the sequence sees, cut into S splits (as on the CPU).
  auto lo = [&](int64_t i) { return wl < 0 ? 0 : imax(0, i + off - wl); };
  auto hi = [&](int64_t i) { return wr < 0 ? Lk : imin(Lk, imax(0, i + off + wr + 1)); };
  const int64_t k_lo = lo(0), k_hi = imax(k_lo, hi(Lq - 1));
  const int64_t chunk = (k_hi - k_lo + S - 1) / S;
  const int64_t ks = imin(k_hi, k_lo + split * chunk), ke = imin(k_hi, ks + chunk);
  const int64_t ntiles = (ke - ks + BLOCK_N - 1) / BLOCK_N;

  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  auto load_tile = [&](int64_t tile, int stage) {
    const int64_t t0 = ks + tile * BLOCK_N;
    for (int c = tid; c < BLOCK_N * CHUNKS; c += NTHREADS) {
      const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
      const int64_t j = t0 + r;
      const T* krow = j < ke ? cache_row(p, kc, p.k_stride, b, hk, j) : nullptr;
      const T* vrow = j < ke ? cache_row(p, vc, p.v_stride, b, hk, j) : nullptr;
      cp_async_16(sK + (stage * BLOCK_N + r) * LDS + col, krow ? krow + col : kc, krow != nullptr);
      cp_async_16(sV + (stage * BLOCK_N + r) * LDS + col, vrow ? vrow + col : vc, vrow != nullptr);
    }
  };

  // Query rows of this CTA (zeros past R).
  const T* qb = static_cast<const T*>(p.q);
  for (int c = tid; c < RPC * CHUNKS; c += NTHREADS) {
    const int rr = c / CHUNKS, col = (c % CHUNKS) * 8;
    const int64_t r = row0 + rr;
    const bool ok = r < R;
    const int64_t i = ok ? r / G : 0, hq = hk * G + (ok ? r % G : 0);
    cp_async_16(sQ + rr * LDS + col, ok ? qb + b * p.q_stride[0] + i * p.q_stride[1] + hq * p.q_stride[2] + col : qb,
                ok);
  }
  if (ntiles > 0) load_tile(0, 0);
  cp_async_commit();

  float m[RPW], l[RPW], acc[RPW][EPL];
#pragma unroll
  for (int w = 0; w < RPW; ++w) {
    m[w] = -INFINITY;  // log2 units
    l[w] = 0.f;        // this lane's partial sum
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[w][e] = 0.f;
  }
  float* sPw = sP + warp * BLOCK_N;

  for (int64_t tile = 0; tile < ntiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < ntiles) {
      load_tile(tile + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t t0 = ks + tile * BLOCK_N;
    const int nvalid = static_cast<int>(imin(BLOCK_N, ke - t0));
    const T* sKs = sK + stage * BLOCK_N * LDS;
    const T* sVs = sV + stage * BLOCK_N * LDS;
#pragma unroll
    for (int w = 0; w < RPW; ++w) {
      const int rr = warp + NWARPS * w;
      const int64_t r = row0 + rr;
      if (r >= R) break;  // warp-uniform
      const int64_t i = r / G, row_lo = lo(i), row_hi = hi(i);
      // Scores of keys lane + 32 x, in log2 units; -inf outside the row's band or the tile.
      float s[KPL];
      float tmax = -INFINITY;
#pragma unroll
      for (int x = 0; x < KPL; ++x) {
        const int kk = lane + 32 * x;
        const T* krow = sKs + kk * LDS;
        const T* qrow = sQ + rr * LDS;
        float dot = 0.f;
#pragma unroll
        for (int d = 0; d < D; d += 8) {
          const uint4 kv = *reinterpret_cast<const uint4*>(krow + d);
          const uint4 qv = *reinterpret_cast<const uint4*>(qrow + d);
          const uint32_t kw[4] = {kv.x, kv.y, kv.z, kv.w}, qw[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const float2 kf = MmaType<T>::unpack(kw[u]), qf = MmaType<T>::unpack(qw[u]);
            dot = fmaf(kf.x, qf.x, fmaf(kf.y, qf.y, dot));
          }
        }
        float sc = dot * p.scale;
        if (p.softcap > 0.f) sc = p.softcap * tanhf(sc / p.softcap);
        const int64_t j = t0 + kk;
        s[x] = (kk < nvalid && j >= row_lo && j < row_hi) ? sc * LOG2E : -INFINITY;
        tmax = fmaxf(tmax, s[x]);
      }
      tmax = warp_max(tmax);
      const float m_new = fmaxf(m[w], tmax);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: avoid -inf - -inf
      const float alpha = exp2f(m[w] - m_use);
      m[w] = m_new;
      float psum = 0.f;
#pragma unroll
      for (int x = 0; x < KPL; ++x) {
        const float pv = exp2f(s[x] - m_use);
        sPw[lane + 32 * x] = pv;
        psum += pv;
      }
      l[w] = l[w] * alpha + psum;
      __syncwarp();
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[w][e] *= alpha;
      for (int kk = 0; kk < nvalid; ++kk) {
        const float pv = sPw[kk];
        const T* vrow = sVs + kk * LDS + lane * EPL;
#pragma unroll
        for (int e = 0; e < EPL; e += 2) {
          const float2 vf = MmaType<T>::unpack(*reinterpret_cast<const uint32_t*>(vrow + e));
          acc[w][e] = fmaf(pv, vf.x, acc[w][e]);
          acc[w][e + 1] = fmaf(pv, vf.y, acc[w][e + 1]);
        }
      }
      __syncwarp();  // sPw is rewritten by the next row
    }
    __syncthreads();  // every warp is done with `stage` before tile + 1 refills it
  }

  cp_async_wait<0>();  // a split with no keys still issued the copy of Q: do not exit with it in flight

  // Normalized partial state of this split: out_partial (S, B, Lq, Hq, D), lse_partial (S, B, Hq, Lq).
#pragma unroll
  for (int w = 0; w < RPW; ++w) {
    const int64_t r = row0 + warp + NWARPS * w;
    if (r >= R) break;
    const int64_t i = r / G, hq = hk * G + r % G;
    const float lt = warp_sum(l[w]);
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    float* o = p.out_partial + (((split * p.B + b) * Lq + i) * p.Hq + hq) * D + lane * EPL;
#pragma unroll
    for (int e = 0; e < EPL; ++e) o[e] = acc[w][e] * inv;
    if (lane == 0)
      p.lse_partial[((split * p.B + b) * p.Hq + hq) * Lq + i] = lt > 0.f ? (m[w] + log2f(lt)) * LN2 : -INFINITY;
  }
}

__device__ inline void store_out(__half* p, float x) { *p = __float2half_rn(x); }
__device__ inline void store_out(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ inline void store_out(float* p, float x) { *p = x; }
__device__ inline float load_in(const __half* p) { return __half2float(*p); }
__device__ inline float load_in(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ inline float load_in(const float* p) { return *p; }

// One warp per output row (b, i, hq): out = sum_s w_s o_s / sum_s w_s, w_s = exp(lse_s - max lse);
// lse = max + log(sum w). A split with lse -inf (it saw no key) has w = 0 and its output is not read.
template <typename T, int D> __global__ void decode_combine_kernel(const DecodeParams p) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;  // over (B, Lq, Hq)
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.Lq * p.Hq) return;
  const int64_t hq = row % p.Hq, i = (row / p.Hq) % p.Lq, b = row / (p.Hq * p.Lq);
  const int64_t S = p.num_splits, lse_stride = p.B * p.Hq * p.Lq, lse_idx = (b * p.Hq + hq) * p.Lq + i;
  float M = -INFINITY;
  for (int64_t s = 0; s < S; ++s) M = fmaxf(M, p.lse_partial[s * lse_stride + lse_idx]);
  T* out = static_cast<T*>(p.out) + row * D;
  if (M == -INFINITY) {
    for (int d = lane; d < D; d += 32) store_out(out + d, 0.f);
    if (lane == 0) p.lse[lse_idx] = -INFINITY;
    return;
  }
  float acc[D / 32];
#pragma unroll
  for (int e = 0; e < D / 32; ++e) acc[e] = 0.f;
  float wsum = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float w = expf(p.lse_partial[s * lse_stride + lse_idx] - M);
    if (w == 0.f) continue;
    wsum += w;
    const float* o = p.out_partial + (s * p.B * p.Lq * p.Hq + row) * D;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) acc[e] = fmaf(w, o[lane + 32 * e], acc[e]);
  }
#pragma unroll
  for (int e = 0; e < D / 32; ++e) store_out(out + lane + 32 * e, acc[e] / wsum);
  if (lane == 0) p.lse[lse_idx] = M + logf(wsum);
}

#ifndef FUSEDATTN_CUDA_EMULATE  // the emulator (tests/cuda_emu) launches the kernels itself
template <typename T, int D> cudaError_t decode_append_launch(const DecodeParams& p, cudaStream_t stream) {
  const int64_t n = p.B * p.Lnew * p.Hkv * D;
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(imin((n + threads - 1) / threads, 65535));
  decode_append_kernel<T, D><<<blocks, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D> cudaError_t decode_fwd_launch(const DecodeParams& p, cudaStream_t stream) {
  using Cfg = DecodeConfig<D>;
  auto kernel = decode_split_kv_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM_BYTES);
  if (err != cudaSuccess) return err;
  const int64_t row_chunks = (p.Lq * (p.Hq / p.Hkv) + Cfg::ROWS_PER_CTA - 1) / Cfg::ROWS_PER_CTA;
  const dim3 grid(static_cast<unsigned>(p.num_splits * row_chunks), static_cast<unsigned>(p.Hkv),
                  static_cast<unsigned>(p.B));
  kernel<<<grid, Cfg::NWARPS * 32, Cfg::SMEM_BYTES, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t rows = p.B * p.Lq * p.Hq;
  decode_combine_kernel<T, D><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

#endif

}  // namespace fusedattn::cuda
