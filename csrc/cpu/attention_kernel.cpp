// Fused flash-style attention on the CPU: forward (online softmax, LSE out) and backward
// (recomputing the scores per tile). Compiled once per ISA (CMakeLists.txt sets CPU_CAPABILITY
// and the -m flags), so at::vec::Vectorized<float> is 8 lanes on AVX2 and 16 on AVX-512.
//
// Design, and why it beats ATen's cpu_flash_attention on small core counts:
//  * All arithmetic is fp32. bf16/fp16 inputs are converted exactly once (K to row-major fp32,
//    V into GEMM panels, Q per query block); fp32 K is read in place, whatever its strides.
//  * Our own register-tiled GEMM micro-kernel (MR x NR = 6x16 on AVX2, 12x32 on AVX-512, ~94%
//    of one core's FMA peak measured) instead of BLAS calls that re-pack K for every query block.
//    It broadcasts A elements through arbitrary (row, k) strides, so K, P^T and dS^T need no
//    transposed copies.
//  * The forward computes scores transposed (keys x queries), so the softmax statistics are
//    vertical vector operations (one vector = VL queries) with no horizontal reductions.
//  * Masking is range-based (causal / window in both alignments, applied only to blocks the
//    band cuts), blocks that are entirely invisible are skipped, and the rescale of O by
//    exp(m_old - m_new) is folded into the P.V micro-kernel's load of O.
//  * Work is handed out dynamically, heaviest query blocks first, so causal rows balance.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/attention.h"
#include "cpu/kernel_utils.h"

#ifndef CPU_CAPABILITY
#error "attention_kernel.cpp must be compiled with -DCPU_CAPABILITY=<ISA> (see CMakeLists.txt)"
#endif

namespace fusedattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Tile sizes (query rows x keys). BLOCK_M x BLOCK_N fp32 scores (64 KiB) plus the K/V panels of
// one key block (2 x 256 x D fp32) stay in a 512 KiB L2 next to the Q and O tiles.
constexpr int64_t BLOCK_M_BWD = 64;
constexpr int64_t BLOCK_N_BWD = 64;  // multiple of NR for every ISA

// Uninitialized fp32 scratch (the packers write every element). Large buffers ask for transparent
// huge pages: a fresh 8 MiB pack otherwise costs ~2000 page faults per call.
struct Scratch {
  float* ptr = nullptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = std::max<size_t>(64, (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64);
    const size_t align = bytes >= (size_t(2) << 20) ? (size_t(2) << 20) : 64;
    ptr = static_cast<float*>(std::aligned_alloc(align, (bytes + align - 1) / align * align));
    TORCH_CHECK(ptr != nullptr, "fusedattn (cpu): out of memory allocating ", bytes, " bytes of scratch");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align > 64) madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() const { return ptr; }
};

// ---------------------------------------------------------------------------------------------
// Loading and packing (the one place where input dtypes are converted to fp32).
// ---------------------------------------------------------------------------------------------
// "Row panels": for a (rows x cols) matrix X, panel p holds X[:, p*NR : p*NR+NR] as rows of NR
// floats: out[p*rows_alloc*NR + i*NR + c] = X[i][p*NR + c] (zero beyond cols). This is the B
// layout for products whose reduction runs over rows (P.V, dS.K, P^T.dO, dS^T.Q).
template <typename T>
void pack_row_panels(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols,
                     int64_t rows_alloc, float scale, float* out) {
  const int64_t n_panels = cdiv(cols, NR);
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * rs;
    for (int64_t p = 0; p < n_panels; ++p) {
      float* o = out + p * rows_alloc * NR + i * NR;
      const int64_t c0 = p * NR, cn = std::min(NR, cols - c0);
      for (int64_t c = 0; c < cn; ++c) o[c] = scale * to_f(s[(c0 + c) * cs]);
      for (int64_t c = cn; c < NR; ++c) o[c] = 0.f;
    }
  }
}

// "Column panels" of X^T: for X (rows x cols), panel p holds rows p*NR..p*NR+NR of X,
// transposed: out[p*cols*NR + d*NR + c] = X[p*NR + c][d] (zero rows beyond `rows`). This is the
// B layout for Q.K^T and dO.V^T (reduction over the head dim).
template <typename T>
void pack_col_panels(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* out,
                     float scale = 1.f) {
  const int64_t n_panels = cdiv(rows, NR);
  for (int64_t p = 0; p < n_panels; ++p) {
    float* o = out + p * cols * NR;
    const int64_t r0 = p * NR, rn = std::min(NR, rows - r0);
    for (int64_t c = 0; c < rn; ++c) {
      const T* s = src + (r0 + c) * rs;
      for (int64_t d = 0; d < cols; ++d) o[d * NR + c] = scale * to_f(s[d * cs]);
    }
    for (int64_t c = rn; c < NR; ++c)
      for (int64_t d = 0; d < cols; ++d) o[d * NR + c] = 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, in the transposed form: for a block of BM queries and BN keys the kernel computes
//   st (keys x queries) = K_blk . (scale * Q_blk)^T
// so that K is the GEMM's A operand (broadcast element by element, any strides: fp32 K is read
// in place, never transposed or packed) and the small Q block is the packed B operand. The
// softmax statistics are then per column: the max, exp and sum run down the key rows with one
// vector covering VL queries, with no horizontal reductions. P.V reads st transposed through
// the A strides; V is packed once per kv head into row panels (a contiguous copy).
// ---------------------------------------------------------------------------------------------
// Query rows per block: a compile-time constant so the per-column statistics of a whole block
// (BM / VL vectors) live in registers while the key rows stream past.
constexpr int64_t BLOCK_M_FWD = 64;  // multiple of NR on every ISA
constexpr int XV = BLOCK_M_FWD / VL;  // vectors per scores row
constexpr float kLog2e = 1.4426950408889634f;

// exp(x) for x = t / log2(e) <= 0, given t: 2^t as 2^round(t) * 2^f with f in [-0.5, 0.5]
// (Cephes' degree-6 polynomial, relative error ~1e-7), the integer part added to the exponent
// bits. t < -126 (including -inf) gives exactly 0. ~15 vector ops against ~21 for exp_u20.
// The caller passes (s - m) * log2(e): s - m first, so the row maximum gives exactly 0 at any
// magnitude of the scores (folding -m*log2(e) into one FMA loses that beyond |s| ~ 1e9).
typedef int32_t vint __attribute__((vector_size(VL * sizeof(int32_t))));
inline vfloat exp2_nonpositive(vfloat t) {
  const vint tiny = t < -126.0f;
  t = (vfloat)(((vint)t & ~tiny) | ((vint)(vfloat{} - 126.0f) & tiny));
  const vfloat fx = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const vfloat f = t - fx;
  vfloat p = vfloat{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vint e = __builtin_convertvector(fx, vint) << 23;
  return (vfloat)(((vint)p + e) & ~tiny);
}

// Online-softmax update for one block of transposed scores st (nk key rows x BLOCK_M_FWD query
// columns), in place: st <- exp(st - m_new); per query column updates the running max m, the
// running sum l (l = alpha * l + sum), alpha = exp(m_old - m_new) for rescaling O, and a NaN flag
// (a NaN score makes the row NaN at the end; its statistics are kept finite meanwhile).
// Both passes walk st row by row (contiguous) with the column state in registers.
void column_softmax_block(float* st, int64_t nk, float* m, float* l, float* alpha, float* nan_flag) {
  constexpr int64_t BM = BLOCK_M_FWD;
  vfloat mx[XV];
  vint isnan[XV];
#pragma GCC unroll 16
  for (int x = 0; x < XV; ++x) {
    mx[x] = vfloat{} + kNegInf;
    isnan[x] = vint{};
  }
  for (int64_t j = 0; j < nk; ++j) {
    const float* row = st + j * BM;
#pragma GCC unroll 16
    for (int x = 0; x < XV; ++x) {
      const vfloat v = load_v(row + x * VL);
      mx[x] = v > mx[x] ? v : mx[x];
      isnan[x] |= (v != v);
    }
  }
  vfloat neg_m[XV];  // p = exp(s - m) = 2^((s - m) * log2(e)), s - m exact for s == m
#pragma GCC unroll 16
  for (int x = 0; x < XV; ++x) {
    const vfloat m_old = load_v(m + x * VL);
    const vint nan_old = (vint)load_v(nan_flag + x * VL);
    store_v(nan_flag + x * VL, (vfloat)(nan_old | isnan[x]));
    const vfloat m_new = mx[x] > m_old ? mx[x] : m_old;
    store_v(m + x * VL, m_new);
    const vfloat m_use = m_new == kNegInf ? vfloat{} : m_new;  // nothing seen yet: exp(-inf - 0) = 0
    store_v(alpha + x * VL, exp2_nonpositive((m_old - m_use) * kLog2e));
    neg_m[x] = -m_use;
  }
  // Two halves of the columns per sweep: each keeps its offsets and sums in registers (AVX2
  // has 16).
  constexpr int XH = XV > 4 ? XV / 2 : XV;
  for (int x0 = 0; x0 < XV; x0 += XH) {
    vfloat sum[XH];
#pragma GCC unroll 16
    for (int x = 0; x < XH; ++x) sum[x] = vfloat{};
    for (int64_t j = 0; j < nk; ++j) {
      float* row = st + j * BM + x0 * VL;
#pragma GCC unroll 16
      for (int x = 0; x < XH; ++x) {
        const vfloat e = exp2_nonpositive((load_v(row + x * VL) + neg_m[x0 + x]) * kLog2e);
        store_v(row + x * VL, e);
        sum[x] += e;
      }
    }
#pragma GCC unroll 16
    for (int x = 0; x < XH; ++x) {
      const int xi = x0 + x;
      store_v(l + xi * VL, load_v(l + xi * VL) * load_v(alpha + xi * VL) + sum[x]);
    }
  }
}
// Keys per forward block; the FUSEDATTN_CPU_BLOCK_N knob (kernel_utils.h) overrides it.
inline int64_t block_n_fwd() {
  static const int64_t v = env_block_size("FUSEDATTN_CPU_BLOCK_N", 256, 4096, MR);
  return v;
}

template <typename T>
void fwd_impl(const AttnFwdParams& p) {
  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, Lk = p.Lk, D = p.D, Dv = p.Dv;
  const int64_t group = Hq / Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int64_t BM = BLOCK_M_FWD, BN = block_n_fwd();
  const int64_t Dv_pad = round_up(Dv, NR);
  const Band band{Lk, p.mask.diag_offset, p.mask.window_left, p.mask.window_right};
  constexpr bool kIsFloat = std::is_same_v<T, float>;

  // K as the A operand: fp32 inputs in place, others converted once to row-major fp32.
  const bool k_in_place = kIsFloat;
  // V is always packed into row panels (a cheap, contiguous copy): reading fp32 V in place, the
  // panel's rows sit one V row apart and alias in L1 (measured ~7% slower at D=64).
  const int64_t k_conv_sz = k_in_place ? 0 : Lk * D, v_pack_sz = Dv_pad * Lk;
  Scratch k_conv(B * Hkv * k_conv_sz), v_pack(B * Hkv * v_pack_sz);
  {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        if (!k_in_place)
          load_rows(k + b * p.k_stride[0] + h * p.k_stride[1], p.k_stride[2], p.k_stride[3], Lk, D, 1.f,
                    k_conv.data() + bh * k_conv_sz, D, D);
        pack_row_panels(v + b * p.v_stride[0] + h * p.v_stride[1], p.v_stride[2], p.v_stride[3], Lk, Dv,
                          Lk, 1.f, v_pack.data() + bh * v_pack_sz);
      }
    });
  }

  const int64_t nqb = cdiv(Lq, BM);
  struct Ctx {
    std::vector<float> qt, st, o, m, l, alpha, lo, hi, nan;
  };
  run_tasks(
      B * Hq * nqb,
      [&] {
        return Ctx{std::vector<float>(std::max<int64_t>(D, 1) * BM), std::vector<float>(BN * BM),
                   std::vector<float>(BM * Dv_pad), std::vector<float>(BM), std::vector<float>(BM),
                   std::vector<float>(BM), std::vector<float>(BM), std::vector<float>(BM),
                   std::vector<float>(BM)};
      },
      [&](Ctx& c, int64_t t) {
        // Heaviest (last, for causal) query blocks first, heads interleaved.
        const int64_t qb = nqb - 1 - t / (B * Hq), bh = t % (B * Hq);
        const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
        const int64_t i0 = qb * BM, rows = std::min(BM, Lq - i0);
        // qt: BM/NR column panels (D x NR) of scale * q[b, h, i0:i0+rows, :] (zero beyond rows)
        pack_col_panels(q + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2], p.q_stride[2],
                        p.q_stride[3], rows, D, c.qt.data(), p.scale);
        std::fill(c.qt.begin() + cdiv(rows, NR) * D * NR, c.qt.end(), 0.f);  // lanes past the last query
        std::fill(c.o.begin(), c.o.end(), 0.f);
        std::fill(c.m.begin(), c.m.end(), kNegInf);
        std::fill(c.l.begin(), c.l.end(), 0.f);
        std::fill(c.nan.begin(), c.nan.end(), 0.f);
        const int64_t bk = b * Hkv + hk;
        const float* ka = k_in_place ? reinterpret_cast<const float*>(k) + b * p.k_stride[0] + hk * p.k_stride[1]
                                     : k_conv.data() + bk * k_conv_sz;
        const int64_t ka_rs = k_in_place ? p.k_stride[2] : D, ka_ks = k_in_place ? p.k_stride[3] : 1;
        const float* vb = v_pack.data() + bk * v_pack_sz;
        const float* mask_b =
            p.mask.mask ? p.mask.mask + b * p.mask.mask_stride[0] + h * p.mask.mask_stride[1] : nullptr;
        const int64_t n_lo = band.lo(i0), n_hi = band.hi(i0 + rows - 1);  // keys any row can see
        const int64_t n_panels = BM / NR;
        for (int64_t n0 = n_lo; n0 < n_hi; n0 += BN) {
          const int64_t nk = std::min(BN, n_hi - n0);  // key rows of st
          float* st = c.st.data();
          // st (nk x BM) = k[n0:n0+nk] . qt
          gemm_panels(nk, n_panels, D, ka + n0 * ka_rs, ka_rs, ka_ks, c.qt.data(), D * NR, st, BM, 0);
          if (p.softcap > 0.f) {
            const Vec capv(p.softcap), inv(1.f / p.softcap);
            for (int64_t x = 0; x < nk * BM; x += VL) ((Vec::loadu(st + x) * inv).tanh() * capv).store(st + x);
          }
          if (mask_b) {  // additive mask, transposed into st: (query r, key j) -> st[j][r]
            for (int64_t r = 0; r < rows; ++r) {
              const float* mr = mask_b + (i0 + r) * p.mask.mask_stride[2] + n0;
              if (p.mask.mask_hides)
                for (int64_t j = 0; j < nk; ++j) st[j * BM + r] = mr[j] == kNegInf ? kNegInf : st[j * BM + r];
              else
                for (int64_t j = 0; j < nk; ++j) st[j * BM + r] += mr[j];
            }
          }
          // Band (causal / window): needed unless every real query sees every key of the block.
          const bool full = band.lo(i0 + rows - 1) <= n0 && band.hi(i0) >= n0 + nk && rows == BM;
          if (!full) {
            // Row r sees block keys [lo[r], hi[r]), relative to n0 and clipped to [0, nk], so
            // they compare exactly in float32 whatever the sequence length. Lanes past `rows`: none.
            for (int64_t r = 0; r < BM; ++r) {
              c.lo[r] = r < rows ? static_cast<float>(std::clamp<int64_t>(band.lo(i0 + r) - n0, 0, nk)) : 0.f;
              c.hi[r] = r < rows ? static_cast<float>(std::clamp<int64_t>(band.hi(i0 + r) - n0, 0, nk)) : 0.f;
            }
            const Vec ninf(kNegInf);
            for (int64_t j = 0; j < nk; ++j) {
              const Vec jv(static_cast<float>(j));
              float* sj = st + j * BM;
              for (int64_t x = 0; x < BM; x += VL) {
                const Vec vis = (jv >= Vec::loadu(c.lo.data() + x)) & (jv < Vec::loadu(c.hi.data() + x));
                Vec::blendv(ninf, Vec::loadu(sj + x), vis).store(sj + x);
              }
            }
          }
          column_softmax_block(st, nk, c.m.data(), c.l.data(), c.alpha.data(), c.nan.data());
          // o (BM x Dv_pad) = alpha * o + st^T . v[n0:n0+nk]
          gemm_panels(rows, Dv_pad / NR, nk, st, 1, BM, vb + n0 * NR, Lk * NR, c.o.data(), Dv_pad, 2,
                      c.alpha.data());
        }
        const int64_t out_rs = p.out_stride[2];
        T* out_rows = out + b * p.out_stride[0] + h * p.out_stride[1] + i0 * out_rs;
        float* lse_rows = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1] + i0;
        for (int64_t r = 0; r < rows; ++r) {
          const float m = c.m[r], l = c.l[r];
          const float* o = c.o.data() + r * Dv_pad;
          if (c.nan[r] != 0.f || l != l) {  // a NaN score, or a +inf one (inf - inf in the update)
            store_row(o, NAN, out_rows + r * out_rs, Dv);
            lse_rows[r] = NAN;
          } else if (l > 0.f) {
            store_row(o, 1.f / l, out_rows + r * out_rs, Dv);
            lse_rows[r] = m + std::log(l);
          } else {  // fully masked row: output 0, lse -inf
            store_row(o, 0.f, out_rows + r * out_rs, Dv);
            lse_rows[r] = kNegInf;
          }
        }
      });
}

// ---------------------------------------------------------------------------------------------
// Backward. One task per (b, query head): it owns dQ for that head and writes its own dK/dV
// contribution (fp32, per query head; the caller sums GQA groups), so nothing is shared between
// threads and the result does not depend on the thread count (deterministic).
//   s  = scale * q.k^T  (softcap: s_c = cap * tanh(s / cap)),  p = exp(s_c + mask - lse)
//   dv += p^T . do;  dp = do . v^T;  ds = p * (dp - delta) * (1 - (s_c / cap)^2)
//   dq += scale * ds . k;  dk += scale * ds^T . q
// ---------------------------------------------------------------------------------------------
template <typename T>
void bwd_impl(const AttnBwdParams& p) {
  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, Lk = p.Lk, D = p.D, Dv = p.Dv;
  const int64_t group = Hq / Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);
  const int64_t BM = BLOCK_M_BWD, BN = BLOCK_N_BWD;
  const int64_t D_pad = round_up(D, NR), Dv_pad = round_up(Dv, NR);
  const int64_t Lk_pad = round_up(Lk, NR), Lq_alloc = std::max<int64_t>(Lq, 1);
  const Band band{Lk, p.mask.diag_offset, p.mask.window_left, p.mask.window_right};

  // Per kv head: K as column panels (for q.k^T) and row panels (for ds.k), V as column panels
  // (for do.v^T).
  const int64_t kc_sz = Lk_pad * D, kr_sz = D_pad * Lk, vc_sz = Lk_pad * Dv;
  Scratch kc(B * Hkv * kc_sz), kr(B * Hkv * kr_sz), vc(B * Hkv * vc_sz);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const T* kb = k + b * p.k_stride[0] + h * p.k_stride[1];
      const T* vb = v + b * p.v_stride[0] + h * p.v_stride[1];
      pack_col_panels(kb, p.k_stride[2], p.k_stride[3], Lk, D, kc.data() + bh * kc_sz);
      pack_row_panels(kb, p.k_stride[2], p.k_stride[3], Lk, D, Lk, 1.f, kr.data() + bh * kr_sz);
      pack_col_panels(vb, p.v_stride[2], p.v_stride[3], Lk, Dv, vc.data() + bh * vc_sz);
    }
  });

  struct Ctx {
    std::vector<float> qs, qr, dor, dorp, dqa, s, sc, dp, dka, dva;
  };
  run_tasks(
      B * Hq,
      [&] {
        return Ctx{std::vector<float>(Lq_alloc * std::max<int64_t>(D, 1)),  // qs rows (scaled)
                   std::vector<float>(D_pad * Lq_alloc),                   // q row panels (scaled)
                   std::vector<float>(Lq_alloc * std::max<int64_t>(Dv, 1)),  // do rows
                   std::vector<float>(Dv_pad * Lq_alloc),                  // do row panels
                   std::vector<float>(Lq_alloc * D_pad),                   // dq accumulator
                   std::vector<float>(BM * BN),                            // p
                   std::vector<float>(p.softcap > 0.f ? BM * BN : 0),      // capped scores
                   std::vector<float>(BM * BN),                            // dp -> ds
                   std::vector<float>(BN * D_pad),                         // dk block
                   std::vector<float>(BN * Dv_pad)};                       // dv block
      },
      [&](Ctx& c, int64_t bh) {
        const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
        const T* qb = q + b * p.q_stride[0] + h * p.q_stride[1];
        const T* dob = dout + b * p.dout_stride[0] + h * p.dout_stride[1];
        load_rows(qb, p.q_stride[2], p.q_stride[3], Lq, D, p.scale, c.qs.data(), D, D);
        pack_row_panels(qb, p.q_stride[2], p.q_stride[3], Lq, D, Lq_alloc, p.scale, c.qr.data());
        load_rows(dob, p.dout_stride[2], p.dout_stride[3], Lq, Dv, 1.f, c.dor.data(), Dv, Dv);
        pack_row_panels(dob, p.dout_stride[2], p.dout_stride[3], Lq, Dv, Lq_alloc, 1.f, c.dorp.data());
        std::fill(c.dqa.begin(), c.dqa.end(), 0.f);
        const float* lse = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
        const float* delta = p.delta + b * p.lse_stride[0] + h * p.lse_stride[1];
        const float* kcb = kc.data() + (b * Hkv + hk) * kc_sz;
        const float* krb = kr.data() + (b * Hkv + hk) * kr_sz;
        const float* vcb = vc.data() + (b * Hkv + hk) * vc_sz;
        const float* mask_b =
            p.mask.mask ? p.mask.mask + b * p.mask.mask_stride[0] + h * p.mask.mask_stride[1] : nullptr;
        float* dk_out = p.dk_per_qhead + (b * Hq + h) * Lk * D;
        float* dv_out = p.dv_per_qhead + (b * Hq + h) * Lk * Dv;
        const float cap = p.softcap;

        for (int64_t n0 = 0; n0 < Lk; n0 += BN) {
          const int64_t n_valid = std::min(BN, Lk - n0), width = round_up(n_valid, NR);
          std::fill(c.dka.begin(), c.dka.end(), 0.f);
          std::fill(c.dva.begin(), c.dva.end(), 0.f);
          for (int64_t i0 = 0; i0 < Lq; i0 += BM) {
            const int64_t rows = std::min(BM, Lq - i0);
            // Skip query blocks that see none of keys [n0, n0 + n_valid).
            if (band.hi(i0 + rows - 1) <= n0 || band.lo(i0) >= n0 + n_valid) continue;
            float* s = c.s.data();
            gemm_panels(rows, width / NR, D, c.qs.data() + i0 * D, D, 1, kcb + (n0 / NR) * D * NR,
                        D * NR, s, BN, 0);
            bool any = false;
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = i0 + r;
              float* sr = s + r * BN;
              if (cap > 0.f) {
                apply_softcap(sr, width, cap);
                std::copy(sr, sr + width, c.sc.data() + r * BN);  // capped, before the mask
              }
              mask_scores_row(sr, width, n_valid, band.lo(i) - n0, band.hi(i) - n0,
                              mask_b ? mask_b + i * p.mask.mask_stride[2] + n0 : nullptr, p.mask.mask_hides);
              const float m = lse[i];
              if (m == kNegInf) {  // fully masked row: no gradient
                std::fill(sr, sr + width, 0.f);
                continue;
              }
              const Vec mv(m);
              for (int64_t col = 0; col < width; col += VL) (Vec::loadu(sr + col) - mv).exp().store(sr + col);
              any = true;
            }
            if (!any) continue;
            // dv[n0:] += p^T . do[i0:]
            gemm_panels(n_valid, Dv_pad / NR, rows, s, 1, BN, c.dorp.data() + i0 * NR, Lq_alloc * NR,
                        c.dva.data(), Dv_pad, 1);
            // dp = do[i0:] . v[n0:]^T
            float* dp = c.dp.data();
            gemm_panels(rows, width / NR, Dv, c.dor.data() + i0 * Dv, Dv, 1, vcb + (n0 / NR) * Dv * NR,
                        Dv * NR, dp, BN, 0);
            // ds = p * (dp - delta) (* softcap derivative), in place in dp
            for (int64_t r = 0; r < rows; ++r) {
              float* dpr = dp + r * BN;
              const float* pr = s + r * BN;
              const Vec dl(delta[i0 + r]);
              if (cap > 0.f) {
                const float* scr = c.sc.data() + r * BN;
                const Vec inv(1.f / cap), one(1.f);
                for (int64_t col = 0; col < width; col += VL) {
                  const Vec t = Vec::loadu(scr + col) * inv;
                  (Vec::loadu(pr + col) * (Vec::loadu(dpr + col) - dl) * (one - t * t)).store(dpr + col);
                }
              } else {
                for (int64_t col = 0; col < width; col += VL)
                  (Vec::loadu(pr + col) * (Vec::loadu(dpr + col) - dl)).store(dpr + col);
              }
            }
            // dq[i0:] += ds . k[n0:]      (scale applied when dq is written)
            gemm_panels(rows, D_pad / NR, n_valid, dp, BN, 1, krb + n0 * NR, Lk * NR,
                        c.dqa.data() + i0 * D_pad, D_pad, 1);
            // dk[n0:] += ds^T . (scale * q[i0:])
            gemm_panels(n_valid, D_pad / NR, rows, dp, 1, BN, c.qr.data() + i0 * NR, Lq_alloc * NR,
                        c.dka.data(), D_pad, 1);
          }
          for (int64_t j = 0; j < n_valid; ++j) {
            std::copy(c.dka.data() + j * D_pad, c.dka.data() + j * D_pad + D, dk_out + (n0 + j) * D);
            std::copy(c.dva.data() + j * Dv_pad, c.dva.data() + j * Dv_pad + Dv, dv_out + (n0 + j) * Dv);
          }
        }
        T* dq_rows = dq + b * p.dq_stride[0] + h * p.dq_stride[1];
        for (int64_t i = 0; i < Lq; ++i)
          store_row(c.dqa.data() + i * D_pad, p.scale, dq_rows + i * p.dq_stride[2], D);
      });
}

}  // namespace

void attention_fwd_kernel(const AttnFwdParams& p) {
  switch (p.dtype) {
    case InDtype::kFloat32: return fwd_impl<float>(p);
    case InDtype::kBFloat16: return fwd_impl<c10::BFloat16>(p);
    case InDtype::kFloat16: return fwd_impl<c10::Half>(p);
  }
}

void attention_bwd_kernel(const AttnBwdParams& p) {
  switch (p.dtype) {
    case InDtype::kFloat32: return bwd_impl<float>(p);
    case InDtype::kBFloat16: return bwd_impl<c10::BFloat16>(p);
    case InDtype::kFloat16: return bwd_impl<c10::Half>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedattn::cpu
