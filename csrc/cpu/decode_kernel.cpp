// KV-cache decoding on the CPU: attention of a few query rows per sequence over a contiguous or
// paged K/V cache, plus the log-sum-exp merge of partial states. Compiled once per ISA
// (CMakeLists.txt), picked at run time in dispatch.cpp.
//
// Decoding is memory-bound: every cache element is used by only group*Lq query rows, so the
// design goal is to read each K/V element from memory exactly once, convert it once, and keep
// the arithmetic per element small enough to hide behind the loads.
//  * Query rows: for kv head h, all group*Lq query rows that read it (GQA: every query head of
//    the group, every query position) are processed together, so each cache row is loaded once
//    for all of them. No K/V expansion, no packing: keys are read in place.
//  * Tasks = (sequence, group of kv heads, key-range split), handed to threads dynamically,
//    longest sequences first. A task normally owns all kv heads of its sequence (decode.cpp):
//    it walks the keys in blocks of BLOCK_N and, inside a block, KEY_CHUNK keys at a time with
//    all its heads inside, so the loads move through memory in order (a key's heads sit side by
//    side) -- 2x the bandwidth of one task per kv head, whose rows are Hkv*D elements apart.
//  * While a block is computed, the next one is prefetched in memory order (LineCursor): its K
//    during the scores, its V during P.V. The hardware prefetchers alone do not follow a kv
//    head's strided (or paged) rows.
//  * Per kv head and block: a table of row pointers (contiguous and paged caches, any page size,
//    run the same code), then
//      scores  S (rows x BLOCK_N) = (scale*Q) . K^T  as dot products: K rows are streamed once,
//              converted to fp32 on load (bf16: even/odd lanes, one load and two bit operations
//              per 16 elements), each against up to 4 query rows at a time;
//      softmax online per row (running max / sum, exp(m_old - m_new) rescale of O);
//      output  O (rows x Dv) = alpha*O + P . V  with the GEMM micro-kernel reading V's rows in
//              place (converted on load) as its B operand.
//  * Split-KV: the key range of each sequence is cut into num_splits chunks, processed as
//    separate tasks (in parallel when B alone cannot keep the threads busy). Each writes a
//    normalized partial output and its lse to fp32 scratch; combine_lse merges them afterwards.
#include <memory>
#include <numeric>
#include <vector>

#include "cpu/decode.h"
#include "cpu/kernel_utils.h"
#include "op_limits.h"

#ifndef CPU_CAPABILITY
#error "decode_kernel.cpp must be compiled with -DCPU_CAPABILITY=<ISA> (see CMakeLists.txt)"
#endif

namespace fusedattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Keys per block. One block of K and V for all of a task's kv heads (bf16, Hkv = 8, D = 128, 32
// keys: 2 x 64 KiB) is computed while the next one is prefetched: the two take half of a 512 KiB
// L2 (64 keys filled it and measured ~9% slower on Zen 3). A multiple of 16 so that a block's
// scores row is whole vectors for every ISA. The FUSEDATTN_CPU_DECODE_BLOCK_N knob (kernel_utils.h)
// overrides it.
int64_t block_n_decode() {
  static const int64_t v = env_block_size("FUSEDATTN_CPU_DECODE_BLOCK_N", 32, 1024, 16);
  return v;
}
// Keys per step of the loop over a block's kv heads. Small steps keep the loads in memory order
// (8 keys x all heads = 8 consecutive rows of a contiguous cache): measured 20-30% faster than a
// whole block per head. Also the widest key tile of the scores kernel: blocks are padded to it.
constexpr int64_t KEY_CHUNK = 8;

// Where key j of sequence b, kv head h lives (contiguous or paged cache).
template <typename T>
struct CacheView {
  T* base;
  const int64_t* stride;  // (batch or page, position, head, dim); stride[3] == 1
  const DecodeParams& p;

  T* row(int64_t b, int64_t j, int64_t h) const {
    if (p.block_table) {
      const int64_t page = p.block_table[b * p.max_blocks + j / p.page_size];
      return base + page * stride[0] + (j % p.page_size) * stride[1] + h * stride[2];
    }
    const int64_t cb = p.cache_batch_idx ? p.cache_batch_idx[b] : b;
    return base + cb * stride[0] + j * stride[1] + h * stride[2];
  }

  // rows[i] = row(b, j0 + i, h) for i < n, walking pages instead of dividing per key.
  void rows(int64_t b, int64_t j0, int64_t n, int64_t h, const T** out) const {
    if (n <= 0) return;
    if (!p.block_table) {
      const T* r = row(b, j0, h);
      for (int64_t i = 0; i < n; ++i) out[i] = r + i * stride[1];
      return;
    }
    const int32_t* table = p.block_table + b * p.max_blocks;
    int64_t blk = j0 / p.page_size, slot = j0 % p.page_size;
    for (int64_t i = 0; i < n;) {
      const T* page = base + table[blk] * stride[0] + h * stride[2];
      const int64_t m = std::min(n - i, p.page_size - slot);
      for (int64_t x = 0; x < m; ++x) out[i + x] = page + (slot + x) * stride[1];
      i += m;
      ++blk;  // table[blk] is read only if keys remain: never past the pages the sequence uses
      slot = 0;
    }
  }
};

// Software prefetch of every cache line of a row. The hardware prefetchers do not follow a kv
// head's rows, which are Hkv*D elements apart (or scattered over pages), far enough ahead.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__)
  // GCC 12 drops __builtin_prefetch here (it treats it as removable); the asm stays.
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Walks the cache lines of a key block in memory order -- key by key and, within a key, the
// task's kv heads in order (one span when the cache's heads are dense) -- prefetching a few
// lines per call, so that the next block streams in while this one is computed.
template <typename T>
struct LineCursor {
  const T* const* rows = nullptr;  // head-0 row of each key
  int64_t n = 0;                   // keys
  int64_t off0 = 0, seg_stride = 0, segs = 1, seg_bytes = 0;  // per key: segs spans of seg_bytes
  int64_t key = 0, seg = 0;
  const char* line = nullptr;  // next line to fetch in the current span, and the span's end
  const char* end = nullptr;

  LineCursor(int64_t h0, int64_t G, int64_t head_stride, int64_t dim) {
    const bool dense = head_stride == dim;  // the G heads of a key form one contiguous span
    off0 = h0 * head_stride;
    seg_stride = head_stride;
    segs = dense ? 1 : G;
    seg_bytes = (dense ? G * dim : dim) * static_cast<int64_t>(sizeof(T));
  }
  void reset(const T* const* r, int64_t nk) {
    rows = r;
    n = nk;
    key = seg = 0;
    line = end = nullptr;
  }
  // An upper bound (a span not aligned to a line touches one line more than seg_bytes / 64).
  int64_t lines_per_block() const { return n * segs * (seg_bytes / 64 + 2); }
  void advance(int64_t lines) {
    for (; lines > 0; --lines) {
      if (line >= end) {  // next span
        if (key >= n) return;
        const char* start = reinterpret_cast<const char*>(rows[key] + off0 + seg * seg_stride);
        line = start - (reinterpret_cast<uintptr_t>(start) & 63);
        end = start + seg_bytes;
        if (++seg == segs) {
          seg = 0;
          ++key;
        }
      }
      prefetch_line(line);
      line += 64;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Scores: s[r*lds + j] = <qs row r, key j> for r < rows, j < n (n a multiple of KEY_CHUNK).
// Key j's row is krows[j] + koff (koff selects the kv head: the tables hold head 0's rows).
// ---------------------------------------------------------------------------------------------

// RB query rows x KB keys: RB*KB = 8 independent accumulators hide the FMA latency and are
// reduced together (reduce8); each K vector is loaded and converted once and used by RB rows.
// qs rows are in pair order (to_pair_order) over their whole 2*VL chunks.
template <int RB, int KB, typename T>
inline void dot_tile(const float* qs, int64_t ldq, int64_t D, const T* const* krows, int64_t koff, float* s,
                     int64_t lds) {
  static_assert(RB * KB == 8, "reduce8 takes 8 accumulators");
  const T* k[KB];
#pragma GCC unroll 8
  for (int j = 0; j < KB; ++j) k[j] = krows[j] + koff;
  vfloat acc[8];
#pragma GCC unroll 8
  for (int x = 0; x < 8; ++x) acc[x] = vfloat{};
  int64_t d = 0;
  // Two steps per loop trip: 10-12% less time per key x kv head (bf16 D=128, cache in L3 or in
  // DRAM; tools/probes/decode_cycles.cpp); unrolling by 4, 8 or 16 gained no more.
#pragma GCC unroll 2
  for (; d + 2 * VL <= D; d += 2 * VL) {
    vfloat ka[KB], kb[KB];
#pragma GCC unroll 8
    for (int j = 0; j < KB; ++j) load_pair(k[j] + d, ka[j], kb[j]);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const vfloat qa = load_v(qs + r * ldq + d), qb = load_v(qs + r * ldq + d + VL);
#pragma GCC unroll 8
      for (int j = 0; j < KB; ++j) {
        acc[r * KB + j] += qa * ka[j];  // two separate updates: each contracts to one FMA
        acc[r * KB + j] += qb * kb[j];
      }
    }
  }
  for (; d + VL <= D; d += VL) {  // one more vector, in element order
    vfloat kv[KB];
#pragma GCC unroll 8
    for (int j = 0; j < KB; ++j) kv[j] = load_cvt(k[j] + d);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const vfloat qv = load_v(qs + r * ldq + d);
#pragma GCC unroll 8
      for (int j = 0; j < KB; ++j) acc[r * KB + j] += qv * kv[j];
    }
  }
  float sums[8];
  reduce8(acc, sums);
  if (d == D) {  // no head-dim tail: a row's KB sums are adjacent in sums and in s (2-3% faster)
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) std::memcpy(s + r * lds, sums + r * KB, KB * sizeof(float));
    return;
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < KB; ++j) {
      float x = sums[r * KB + j];
      for (int64_t e = d; e < D; ++e) x += qs[r * ldq + e] * to_f(k[j][e]);  // head-dim tail
      s[r * lds + j] = x;
    }
}

// The first row group of each scores call prefetches `lines` lines of the next block's K per key
// tile it computes; the P.V calls prefetch the next block's V the same way. Each phase fetches
// what the next block's same phase reads, so the memory traffic is spread over the whole block
// (prefetching K and V during the scores alone left the memory idle during P.V: ~9% slower).
template <typename T>
struct PrefetchPlan {
  LineCursor<T>& k;
  int64_t lines;
};

template <typename T>
void scores_block(const float* qs, int64_t ldq, int64_t rows, int64_t D, const T* const* krows, int64_t koff,
                  int64_t n, float* s, int64_t lds, const PrefetchPlan<T>& pf) {
  auto prefetch = [&] { pf.k.advance(pf.lines); };
  bool first = true;  // the first pass over the keys prefetches
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4, first = false)
    for (int64_t j = 0; j < n; j += 2) {
      if (first) prefetch();
      dot_tile<4, 2>(qs + r * ldq, ldq, D, krows + j, koff, s + r * lds + j, lds);
    }
  if (rows - r >= 2) {
    for (int64_t j = 0; j < n; j += 4) {
      if (first) prefetch();
      dot_tile<2, 4>(qs + r * ldq, ldq, D, krows + j, koff, s + r * lds + j, lds);
    }
    r += 2;
    first = false;
  }
  if (rows - r == 1)
    for (int64_t j = 0; j < n; j += 8) {
      if (first) prefetch();
      dot_tile<1, 8>(qs + r * ldq, ldq, D, krows + j, koff, s + r * lds + j, lds);
    }
}

// ---------------------------------------------------------------------------------------------
// P.V: o (rows x Dv_pad) = alpha * o + P (rows x K) . V, V's rows (vrows[k] + voff) read in
// place as the micro-kernel's B operand.
// ---------------------------------------------------------------------------------------------

// Columns col0 .. col0+NR of V's rows (col0 includes the head offset), converted on load; the
// output columns come out in pair order (from_pair_order restores them).
template <typename T>
struct CacheRowsPanel {
  const T* const* rows;
  int64_t col0;
  void load2(int64_t k, vfloat& b0, vfloat& b1) const { load_pair(rows[k] + col0, b0, b1); }
};

// The last, partial panel (Dv not a multiple of NR): ncols < NR columns in element order, zero
// beyond.
template <typename T>
struct CacheRowsTailPanel {
  const T* const* rows;
  int64_t col0, ncols;
  void load2(int64_t k, vfloat& b0, vfloat& b1) const {
    float buf[NR];
    for (int64_t c = 0; c < NR; ++c) buf[c] = c < ncols ? to_f(rows[k][col0 + c]) : 0.f;
    b0 = load_v(buf);
    b1 = load_v(buf + VL);
  }
};

template <typename T>
void pv_block(int64_t rows, int64_t Dv, int64_t K, const float* P, int64_t ldp, const T* const* vrows,
              int64_t voff, float* o, int64_t ldo, int mode, const float* alpha) {
  const int64_t full = Dv / NR;
  gemm_tiles(rows, full, K, P, ldp, 1, [&](int64_t p) { return CacheRowsPanel<T>{vrows, voff + p * NR}; }, o,
             ldo, mode, alpha);
  if (Dv % NR)
    gemm_tiles(rows, 1, K, P, ldp, 1,
               [&](int64_t) { return CacheRowsTailPanel<T>{vrows, voff + full * NR, Dv % NR}; }, o + full * NR,
               ldo, mode, alpha);
}

// ---------------------------------------------------------------------------------------------
// combine_lse: merge n partial states of one row (outputs o_s normalized over disjoint key sets,
// log-sum-exps lse_s) into out = sum_s w_s o_s / sum_s w_s, lse = M + log(sum_s w_s), with
// w_s = exp(lse_s - M), M = max_s lse_s. Every lse -inf: out 0, lse -inf. A NaN lse: NaN.
// A state with weight 0 is skipped, so its (unused) output is never read into the sum.
// ---------------------------------------------------------------------------------------------
template <typename Tin, typename Tout>
void combine_lse(int64_t n, const Tin* const* o, const float* lse, int64_t Dv, Tout* out, float* lse_out) {
  float M = kNegInf;
  bool any_nan = false;
  for (int64_t s = 0; s < n; ++s) {
    any_nan |= std::isnan(lse[s]);
    M = std::max(M, lse[s]);
  }
  if (any_nan || M == kNegInf) {
    for (int64_t d = 0; d < Dv; ++d) out[d] = static_cast<Tout>(any_nan ? NAN : 0.f);
    *lse_out = any_nan ? NAN : kNegInf;
    return;
  }
  float w[MAX_SPLITS];  // n <= MAX_SPLITS: the checks' bound on num_splits (csrc/checks.h)
  float wsum = 0.f;
  for (int64_t s = 0; s < n; ++s) {
    w[s] = std::exp(lse[s] - M);
    wsum += w[s];
  }
  const float inv = 1.f / wsum;
  int64_t d = 0;
  for (; d + VL <= Dv; d += VL) {
    vfloat acc{};
    for (int64_t s = 0; s < n; ++s)
      if (w[s] != 0.f) acc += w[s] * load_cvt(o[s] + d);
    float buf[VL];
    store_v(buf, acc);
    store_row(buf, inv, out + d, VL);
  }
  for (; d < Dv; ++d) {
    float acc = 0.f;
    for (int64_t s = 0; s < n; ++s)
      if (w[s] != 0.f) acc += w[s] * to_f(o[s][d]);
    out[d] = static_cast<Tout>(acc * inv);
  }
  *lse_out = M + std::log(wsum);
}

// ---------------------------------------------------------------------------------------------
// Append: k_new / v_new rows into the cache at positions cache_seqlens[b] + i.
// ---------------------------------------------------------------------------------------------
template <typename T>
void copy_row(const T* src, int64_t src_stride, T* dst, int64_t n) {
  if (src_stride == 1) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d * src_stride];
  }
}

template <typename T>
void append_new_rows(const DecodeParams& p, const CacheView<T>& kc, const CacheView<T>& vc) {
  // By Lnew, not by the pointers: an empty k_new (key head dim 0) has a null data pointer while v_new still
  // has rows to write, and the other way round.
  if (p.Lnew == 0) return;
  const T* kn = static_cast<const T*>(p.k_new);
  const T* vn = static_cast<const T*>(p.v_new);
  // Parallel over kv heads only: heads never share a cache row, and within a head the sequences
  // are written in order, so when two of them target one slot (a repeated cache_batch_idx, a
  // shared page) the last one wins, deterministically, as in the reference.
  at::parallel_for(0, p.Hkv, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t b = 0; b < p.B; ++b)
        for (int64_t i = 0; i < p.Lnew; ++i) {
          const int64_t j = p.cache_seqlens[b] + i;
          if (p.D > 0)
            copy_row(kn + b * p.kn_stride[0] + i * p.kn_stride[1] + h * p.kn_stride[2], p.kn_stride[3],
                     kc.row(b, j, h), p.D);
          if (p.Dv > 0)
            copy_row(vn + b * p.vn_stride[0] + i * p.vn_stride[1] + h * p.vn_stride[2], p.vn_stride[3],
                     vc.row(b, j, h), p.Dv);
        }
  });
}

// ---------------------------------------------------------------------------------------------
// decode_split_kv: one task per (sequence, group of kv heads, split); combine_lse when split.
// ---------------------------------------------------------------------------------------------
template <typename T>
void decode_split_kv(const DecodeParams& p) {
  const int64_t BN = block_n_decode();  // first: a bad knob raises before the append writes the caches
  const CacheView<T> kc{static_cast<T*>(p.k_cache), p.k_stride, p};
  const CacheView<T> vc{static_cast<T*>(p.v_cache), p.v_stride, p};
  append_new_rows(p, kc, vc);

  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, D = p.D, Dv = p.Dv, S = p.num_splits;
  const int64_t G = p.kv_heads_per_task, n_groups = Hkv / G;
  const int64_t group = Hq / Hkv, rows = group * Lq;  // query rows per kv head: row r = i * group + g
  if (B == 0 || rows == 0) return;
  const int64_t Dv_pad = round_up(Dv, NR);
  const int64_t ks2 = p.k_stride[2], vs2 = p.v_stride[2];  // kv head offsets (elements)
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.out);

  // Per sequence: the visibility band (on the sequence after the append) and the keys that some
  // query row can see; only those are read (a sliding window reads just the window).
  std::vector<Band> band(B);
  std::vector<int64_t> k_lo(B), k_hi(B), order(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Lk = p.cache_seqlens[b] + p.Lnew;
    band[b] = Band{Lk, Lk - Lq, p.window_left, p.window_right};
    k_lo[b] = band[b].lo(0);
    k_hi[b] = std::max(k_lo[b], band[b].hi(Lq - 1));
  }
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return k_hi[a] - k_lo[a] > k_hi[b] - k_lo[b]; });

  // Split partial states: normalized outputs and lse per (b, kv head, split, row).
  std::unique_ptr<float[]> part_o, part_lse;
  if (S > 1) {
    part_o.reset(new float[B * Hkv * S * rows * Dv_pad]);
    part_lse.reset(new float[B * Hkv * S * rows]);
  }

  struct Ctx {
    std::vector<float> qs, s, o, m, l, alpha, o_row;
    std::vector<int64_t> kv_used;  // per kv head of the task, for the current block
    std::vector<const T*> kcur, knext, vcur, vnext;  // head-0 row pointers of this and the next key block
  };
  run_tasks(
      B * n_groups * S,
      [&] {
        return Ctx{std::vector<float>(G * rows * std::max<int64_t>(D, 1)), std::vector<float>(G * rows * BN),
                   std::vector<float>(G * rows * Dv_pad),                  std::vector<float>(G * rows),
                   std::vector<float>(G * rows),                           std::vector<float>(G * rows),
                   std::vector<float>(Dv_pad),                             std::vector<int64_t>(G),
                   std::vector<const T*>(BN), std::vector<const T*>(BN),   std::vector<const T*>(BN),
                   std::vector<const T*>(BN)};
      },
      [&](Ctx& c, int64_t t) {
        const int64_t b = order[t / (n_groups * S)], h0 = (t / S) % n_groups * G, split = t % S;
        const int64_t chunk = cdiv(k_hi[b] - k_lo[b], S);
        const int64_t ks = std::min(k_hi[b], k_lo[b] + split * chunk), ke = std::min(k_hi[b], ks + chunk);
        // qs: (G, rows, D) = scale * q[b, i, h*group + g, :] for the task's kv heads h
        for (int64_t hh = 0; hh < G; ++hh)
          for (int64_t i = 0; i < Lq; ++i)
            load_rows(q + b * p.q_stride[0] + i * p.q_stride[1] + (h0 + hh) * group * p.q_stride[2],
                      p.q_stride[2], p.q_stride[3], group, D, p.scale, c.qs.data() + (hh * rows + i * group) * D,
                      D, D);
        for (int64_t x = 0; x < G * rows; ++x) to_pair_order<T>(c.qs.data() + x * D, D);
        std::fill(c.o.begin(), c.o.end(), 0.f);
        std::fill(c.m.begin(), c.m.end(), kNegInf);
        std::fill(c.l.begin(), c.l.end(), 0.f);
        const Band& bd = band[b];
        // Key blocks [n0, n0 + BN), read by all the task's kv heads KEY_CHUNK keys at a time, while
        // the next block is prefetched in memory order.
        LineCursor<T> kpf(h0, G, ks2, D), vpf(h0, G, vs2, Dv);
        // key tiles the first row groups of a block's scores calls walk, over all heads (scores_block)
        const int64_t tiles = cdiv(BN, rows >= 4 ? 2 : rows >= 2 ? 4 : 8) * G;
        int64_t n_next = std::min(BN, ke - ks);
        kc.rows(b, ks, n_next, 0, c.knext.data());
        vc.rows(b, ks, n_next, 0, c.vnext.data());
        for (int64_t n0 = ks; n0 < ke; n0 += BN) {
          const int64_t n = n_next, n_pad = round_up(n, KEY_CHUNK);
          std::swap(c.kcur, c.knext);
          std::swap(c.vcur, c.vnext);
          n_next = std::max<int64_t>(0, std::min(BN, ke - n0 - BN));
          kc.rows(b, n0 + BN, n_next, 0, c.knext.data());
          vc.rows(b, n0 + BN, n_next, 0, c.vnext.data());
          kpf.reset(c.knext.data(), n_next);
          vpf.reset(c.vnext.data(), n_next);
          const PrefetchPlan<T> pf{kpf, cdiv(kpf.lines_per_block(), tiles)};
          const int64_t pv_lines = cdiv(vpf.lines_per_block(), cdiv(n, KEY_CHUNK) * G);  // per P.V call
          // Pad the key tiles with copies of the last row: their scores land in columns >= n and
          // are masked below.
          std::fill(c.kcur.begin() + n, c.kcur.begin() + n_pad, c.kcur[n - 1]);
          const int64_t width = round_up(n, VL);
          // Scores of every head, KEY_CHUNK keys at a time with the heads inside: the loads then walk
          // the block in memory order (key by key, a key's heads side by side), which the hardware
          // prefetchers follow. s: (G, rows, BN).
          for (int64_t j0 = 0; j0 < n_pad; j0 += KEY_CHUNK)
            for (int64_t hh = 0; hh < G; ++hh)
              scores_block(c.qs.data() + hh * rows * D, D, rows, D, c.kcur.data() + j0, (h0 + hh) * ks2,
                           std::min(KEY_CHUNK, n_pad - j0), c.s.data() + hh * rows * BN + j0, BN, pf);
          int64_t kv_used_max = 0;
          for (int64_t hh = 0; hh < G; ++hh) {
            float* s = c.s.data() + hh * rows * BN;
            float *m = c.m.data() + hh * rows, *l = c.l.data() + hh * rows, *alpha = c.alpha.data() + hh * rows;
            int64_t& kv_used = c.kv_used[hh];  // keys with a nonzero probability in some row: P.V runs over these
            kv_used = 0;
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = r / group;
              float* sr = s + r * BN;
              if (p.softcap > 0.f) apply_softcap(sr, width, p.softcap);
              const int64_t hi = bd.hi(i) - n0;
              mask_scores_row(sr, width, n, bd.lo(i) - n0, hi, nullptr);
              if (softmax_update_row(sr, width, m[r], l[r], alpha[r])) kv_used = std::max(kv_used, std::min(hi, n));
            }
            kv_used_max = std::max(kv_used_max, kv_used);
          }
          // o += P.V in the same order: KEY_CHUNK keys at a time, heads inside; the first chunk also
          // applies the online-softmax rescale (mode 2), the later ones accumulate (mode 1).
          for (int64_t j0 = 0; j0 < kv_used_max; j0 += KEY_CHUNK)
            for (int64_t hh = 0; hh < G; ++hh)
              if (j0 < c.kv_used[hh]) {
                vpf.advance(pv_lines);
                pv_block(rows, Dv, std::min(KEY_CHUNK, c.kv_used[hh] - j0), c.s.data() + hh * rows * BN + j0, BN,
                         c.vcur.data() + j0, (h0 + hh) * vs2, c.o.data() + hh * rows * Dv_pad, Dv_pad,
                         j0 == 0 ? 2 : 1, c.alpha.data() + hh * rows);
              }
          vpf.advance(vpf.lines_per_block());  // what is left (keys no row can see skip their P.V calls)
        }
        for (int64_t hh = 0; hh < G; ++hh)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t h = h0 + hh, i = r / group, hq = h * group + r % group, x = hh * rows + r;
            float* o = c.o_row.data();
            from_pair_order<T>(c.o.data() + x * Dv_pad, Dv, o);
            if (S == 1) {
              finish_row(o, c.m[x], c.l[x], out + ((b * Lq + i) * Hq + hq) * Dv, Dv, p.lse + (b * Hq + hq) * Lq + i);
            } else {
              const int64_t slot = ((b * Hkv + h) * S + split) * rows + r;
              finish_row(o, c.m[x], c.l[x], part_o.get() + slot * Dv_pad, Dv, part_lse.get() + slot);
            }
          }
      });
  if (S == 1) return;

  // combine_lse over the splits, one output row at a time.
  at::parallel_for(0, B * Hkv * rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<const float*> o(S);
    std::vector<float> lse(S);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t r = x % rows, bh = x / rows, b = bh / Hkv, h = bh % Hkv;
      const int64_t i = r / group, hq = h * group + r % group;
      for (int64_t split = 0; split < S; ++split) {
        const int64_t slot = (bh * S + split) * rows + r;
        o[split] = part_o.get() + slot * Dv_pad;
        lse[split] = part_lse[slot];
      }
      combine_lse(S, o.data(), lse.data(), Dv, out + ((b * Lq + i) * Hq + hq) * Dv, p.lse + (b * Hq + hq) * Lq + i);
    }
  });
}

template <typename T>
void merge_impl(const MergeParams& p) {
  const T* a = static_cast<const T*>(p.out_a);
  const T* b = static_cast<const T*>(p.out_b);
  T* out = static_cast<T*>(p.out);
  const int64_t L = p.L, H = p.H, D = p.D;
  at::parallel_for(0, p.B * L * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int64_t h = x % H, l = (x / H) % L, bb = x / (H * L);
      const T* o[2] = {a + bb * p.oa_stride[0] + l * p.oa_stride[1] + h * p.oa_stride[2],
                       b + bb * p.ob_stride[0] + l * p.ob_stride[1] + h * p.ob_stride[2]};
      const float lse[2] = {p.lse_a[bb * p.la_stride[0] + h * p.la_stride[1] + l * p.la_stride[2]],
                            p.lse_b[bb * p.lb_stride[0] + h * p.lb_stride[1] + l * p.lb_stride[2]]};
      combine_lse(2, o, lse, D, out + x * D, p.lse + (bb * H + h) * L + l);
    }
  });
}

}  // namespace

void decode_fwd_kernel(const DecodeParams& p) {
  switch (p.dtype) {
    case InDtype::kFloat32: return decode_split_kv<float>(p);
    case InDtype::kBFloat16: return decode_split_kv<c10::BFloat16>(p);
    case InDtype::kFloat16: return decode_split_kv<c10::Half>(p);
  }
}

void merge_attention_states_kernel(const MergeParams& p) {
  switch (p.dtype) {
    case InDtype::kFloat32: return merge_impl<float>(p);
    case InDtype::kBFloat16: return merge_impl<c10::BFloat16>(p);
    case InDtype::kFloat16: return merge_impl<c10::Half>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedattn::cpu
