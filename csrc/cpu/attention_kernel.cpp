// Fused flash-style attention on the CPU: forward (online softmax, LSE out) and backward
// (recomputing the scores per tile). Compiled once per ISA (CMakeLists.txt sets CPU_CAPABILITY
// and the -m flags), so at::vec::Vectorized<float> is 8 lanes on AVX2 and 16 on AVX-512.
//
// Design, and why it beats ATen's cpu_flash_attention on small core counts:
//  * All arithmetic is fp32. bf16/fp16 inputs are converted exactly once (K to row-major fp32,
//    V into GEMM panels, Q per query block); fp32 K is read in place, whatever its strides.
//    Exception: the AVX512_BF16 build's bf16 forward (fwd_impl's kPath) multiplies bf16 operands on
//    AMX tiles or with vdpbf16ps, accumulating in fp32; dispatch.cpp says when each is used.
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
#if defined(__AVX512BF16__)
#include <immintrin.h>
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
constexpr int64_t BLOCK_M_FWD = 64;  // multiple of NR on every ISA; four 16-query AMX tiles
constexpr int64_t AMX_ROWS = 16;       // rows of every AMX tile; 32 bf16 (16 pairs) or 16 fp32 per row
constexpr int64_t AMX_TILE_KEYS = 32;  // keys per row of an AMX A tile of V^T
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
// kPackBf16 (the AVX512_BF16 build's bf16 forward): instead of writing p back into st, write it
// rounded to bf16 into pb in the key-pair layout of the P.V dot products (see PairGemm below);
// the running sum l still adds the fp32 values, as torch's CPU flash attention and FlashAttention do.
template <bool kPackBf16 = false>
void column_softmax_block(float* st, int64_t nk, float* m, float* l, float* alpha, float* nan_flag,
                          uint16_t* pb = nullptr) {
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
    if constexpr (kPackBf16) {
#if defined(__AVX512BF16__)
      // Key rows j and j+1 -> one key pair: lane 2r + h of the 32 bf16 holds key j + h of query r.
      const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                  23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      for (int64_t j = 0; j < nk; j += 2) {
        const float* row = st + j * BM + x0 * VL;
        const bool two = j + 1 < nk;  // an odd last key pairs with a zero (its V row is zero too)
        uint16_t* dst = pb + (j / 2) * 2 * BM + x0 * VL * 2;
#pragma GCC unroll 16
        for (int x = 0; x < XH; ++x) {
          const vfloat e0 = exp2_nonpositive((load_v(row + x * VL) + neg_m[x0 + x]) * kLog2e);
          const vfloat e1 = two ? exp2_nonpositive((load_v(row + BM + x * VL) + neg_m[x0 + x]) * kLog2e) : vfloat{};
          sum[x] += e0 + e1;
          const __m512i lo_hi = (__m512i)_mm512_cvtne2ps_pbh((__m512)e1, (__m512)e0);  // [e0 x16 | e1 x16]
          _mm512_storeu_si512(dst + x * VL * 2, _mm512_permutexvar_epi16(interleave, lo_hi));
        }
      }
#endif
    } else {
      for (int64_t j = 0; j < nk; ++j) {
        float* row = st + j * BM + x0 * VL;
#pragma GCC unroll 16
        for (int x = 0; x < XH; ++x) {
          const vfloat e = exp2_nonpositive((load_v(row + x * VL) + neg_m[x0 + x]) * kLog2e);
          store_v(row + x * VL, e);
          sum[x] += e;
        }
      }
    }
#pragma GCC unroll 16
    for (int x = 0; x < XH; ++x) {
      const int xi = x0 + x;
      store_v(l + xi * VL, load_v(l + xi * VL) * load_v(alpha + xi * VL) + sum[x]);
    }
  }
}
#if defined(__AVX512BF16__)
// ---------------------------------------------------------------------------------------------
// bf16 dot products (AVX512_BF16 build only). vdpbf16ps takes two vectors of 16 pairs of bf16 and
// adds both products of pair i to fp32 lane i: acc[i] += a[2i] * b[2i] + a[2i+1] * b[2i+1]. The
// products are exact in fp32, so against widening to fp32 and FMAs it only changes the order of
// the additions, and it does 32 multiply-adds per instruction instead of 16 with no conversions.
// Operands are laid out so that the reduction index runs along the pair:
//   A (M rows): element pair (r, kp) = the two bf16 at A + r*a_rs + kp*a_ks, broadcast as one
//               32-bit value (K rows in place: a_rs = row stride, a_ks = 2; P: a_rs = 2, a_ks = 2*BM);
//   B (panels of NR = 32 columns): for pair kp, 64 bf16 = two vectors, lane c of vector v holds
//               (X[2kp][v*16 + c], X[2kp+1][v*16 + c]).
// Mode 0: C = out_scale * AB; mode 2: C = row_scale[r] * C + AB (the online-softmax rescale).
// ---------------------------------------------------------------------------------------------
static_assert(VL == 16 && NR == 32, "the bf16 dot-product path is written for 16-lane AVX-512 vectors");
constexpr int64_t PAIR_PANEL = 2 * NR;  // bf16 per pair step of a B panel

template <int M>
inline void pair_micro_kernel(int64_t KP, const uint16_t* __restrict A, int64_t a_rs, int64_t a_ks,
                              const uint16_t* __restrict B, float* __restrict C, int64_t ldc, int mode,
                              const float* row_scale, float out_scale) {
  __m512 c0[M], c1[M];
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    c0[r] = _mm512_setzero_ps();
    c1[r] = _mm512_setzero_ps();
  }
  for (int64_t kp = 0; kp < KP; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + kp * PAIR_PANEL);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + kp * PAIR_PANEL + NR);
    const uint16_t* a = A + kp * a_ks;
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * a_rs, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    float* c = C + r * ldc;
    if (mode == 0) {
      const __m512 s = _mm512_set1_ps(out_scale);
      _mm512_storeu_ps(c, _mm512_mul_ps(c0[r], s));
      _mm512_storeu_ps(c + VL, _mm512_mul_ps(c1[r], s));
    } else {
      const __m512 s = _mm512_set1_ps(row_scale[r]);
      _mm512_storeu_ps(c, _mm512_fmadd_ps(_mm512_loadu_ps(c), s, c0[r]));
      _mm512_storeu_ps(c + VL, _mm512_fmadd_ps(_mm512_loadu_ps(c + VL), s, c1[r]));
    }
  }
}

template <int M>
inline void pair_micro_dispatch(int m, int64_t KP, const uint16_t* A, int64_t a_rs, int64_t a_ks, const uint16_t* B,
                                float* C, int64_t ldc, int mode, const float* rs, float out_scale) {
  if constexpr (M > 0) {
    if (m == M) return pair_micro_kernel<M>(KP, A, a_rs, a_ks, B, C, ldc, mode, rs, out_scale);
    return pair_micro_dispatch<M - 1>(m, KP, A, a_rs, a_ks, B, C, ldc, mode, rs, out_scale);
  }
}

// C[M x (n_panels*NR)] op= A[M x 2KP] . B, B = n_panels pair panels (panel p at Bp + p*panel_stride).
inline void pair_gemm(int64_t M, int64_t n_panels, int64_t KP, const uint16_t* A, int64_t a_rs, int64_t a_ks,
                      const uint16_t* Bp, int64_t panel_stride, float* C, int64_t ldc, int mode,
                      const float* row_scale, float out_scale = 1.f) {
  for (int64_t p = 0; p < n_panels; ++p) {
    const uint16_t* b = Bp + p * panel_stride;
    float* c = C + p * NR;
    int64_t r = 0;
    for (; r + MR <= M; r += MR)
      pair_micro_kernel<MR>(KP, A + r * a_rs, a_rs, a_ks, b, c + r * ldc, ldc, mode,
                            row_scale ? row_scale + r : nullptr, out_scale);
    if (r < M)
      pair_micro_dispatch<MR - 1>(static_cast<int>(M - r), KP, A + r * a_rs, a_rs, a_ks, b, c + r * ldc, ldc, mode,
                                  row_scale ? row_scale + r : nullptr, out_scale);
  }
}

// X (rows x cols, bf16, any strides) as pair panels over its columns, the reduction running over
// rows: out[p*panel_stride + (i/2)*64 + v*32 + c*2 + i%2] = X[i][p*32 + v*16 + c], zero beyond
// rows / cols; panel_stride = cdiv(rows, 2) * 64. (V for P.V: rows = keys.)
inline void pack_pair_panels_rows(const c10::BFloat16* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols,
                                  uint16_t* out) {
  const int64_t n_panels = cdiv(cols, NR), panel_stride = cdiv(rows, 2) * PAIR_PANEL;
  std::memset(out, 0, n_panels * panel_stride * sizeof(uint16_t));
  for (int64_t i = 0; i < rows; ++i) {
    const c10::BFloat16* s = src + i * rs;
    uint16_t* o = out + (i / 2) * PAIR_PANEL + (i % 2);
    for (int64_t col = 0; col < cols; ++col) o[(col / NR) * panel_stride + (col % NR) * 2] = s[col * cs].x;
  }
}

// X^T as pair panels, the reduction running over X's columns (Q for K.Q^T: rows = queries):
// out[p*panel_stride + (d/2)*64 + v*32 + c*2 + d%2] = X[p*32 + v*16 + c][d], zero beyond rows / cols;
// panel_stride = cdiv(cols, 2) * 64; n_panels panels are written (rows <= n_panels*32).
inline void pack_pair_panels_cols(const c10::BFloat16* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols,
                                  int64_t n_panels, uint16_t* out) {
  const int64_t panel_stride = cdiv(cols, 2) * PAIR_PANEL;
  std::memset(out, 0, n_panels * panel_stride * sizeof(uint16_t));
  for (int64_t r = 0; r < rows; ++r) {
    const c10::BFloat16* s = src + r * rs;
    uint16_t* o = out + (r / NR) * panel_stride + (r % NR) * 2;
    for (int64_t d = 0; d < cols; ++d) o[(d / 2) * PAIR_PANEL + (d % 2)] = s[d * cs].x;
  }
}
#endif  // __AVX512BF16__

#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FUSEDATTN_AMX 1
// ---------------------------------------------------------------------------------------------
// AMX tiles. tdpbf16ps C, A, B: C (16 x 16 fp32) += A (16 rows x 32 bf16) . B, B being 16 rows of
// 16 bf16 pairs (B row k, pair n = (X[2k][n], X[2k+1][n])): the same pair layout as the vdpbf16ps
// B panels above, so the Q block and P are packed once for either. Every tile is 16 rows x 64
// bytes; tiles 0-3 accumulate (four 16-query column tiles), 4 holds A, 5 holds B. The tile state
// is per thread: each task loads the configuration and releases it when it ends.
// ---------------------------------------------------------------------------------------------
struct TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// GCC's tile intrinsics are asm statements that declare no memory operands (ldtilecfg declares 8
// of its 64 bytes): a compiler barrier before tile loads and after tile stores keeps ordinary
// loads and stores of the same buffers on the right side of them.
inline void amx_barrier() { __asm__ volatile("" ::: "memory"); }
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  amx_barrier();
  _tile_loadconfig(&cfg);
  amx_barrier();
}
// The tile number of an intrinsic is pasted into the instruction text: one literal per
// accumulator tile.
#define FUSEDATTN_ACC_TILES(X) X(0) X(1) X(2) X(3)
#endif

// Keys per forward block; the FUSEDATTN_CPU_BLOCK_N knob (kernel_utils.h) overrides it.
inline int64_t block_n_fwd() {
  static const int64_t v = env_block_size("FUSEDATTN_CPU_BLOCK_N", 256, 4096, MR);
  return v;
}

// kPath: how the two products are computed.
//  kWiden (every ISA, every dtype): inputs widened to fp32, the register-tile FMA GEMM above.
//  kPairDot (bf16, AVX512_BF16 build): vdpbf16ps on bf16 operands, K read in place (or copied,
//    still bf16), V and the Q block packed into pair panels, P rounded to bf16 by the softmax.
//  kAmx (bf16, AVX512_BF16 build with AMX; D % 32 == 0, Dv % 16 == 0): the same operands on AMX
//    tiles; K copied into zero-padded rows, V transposed (O is accumulated transposed, Dv x
//    queries, so that P^T is the B operand in the layout the softmax writes).
// The scores, softmax statistics and O stay fp32 in every path; masking, softcap and the online
// softmax are shared code.
enum FwdPath : int { kWiden = 0, kPairDot = 1, kAmx = 2 };

template <typename T, int kPath = kWiden>
void fwd_impl(const AttnFwdParams& p) {
  constexpr bool kPair = kPath == kPairDot, kTiles = kPath == kAmx, kBf16Ops = kPath != kWiden;
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

  // K as the A operand: fp32 inputs in place, others converted once to row-major fp32. The pair
  // path reads bf16 K in place when its pairs are adjacent (last stride 1, even D), else it copies
  // K into rows of D2 = round_up(D, 2) bf16 (zero pad).
  const int64_t D2 = round_up(D, 2), Lk2 = round_up(Lk, 2);
  const bool k_in_place = kIsFloat || (kPair && p.k_stride[3] == 1 && D % 2 == 0);
  // AMX: K rows padded by one tile of zero rows (the scores of a block are computed for whole
  // tiles of 16 keys); V^T rows of ldvt keys, zero past Lk (P.V runs over whole tiles of 32 keys).
  const int64_t ldvt = Lk2 + 2 * AMX_TILE_KEYS;
  // V is always packed into row panels (a cheap, contiguous copy): reading fp32 V in place, the
  // panel's rows sit one V row apart and alias in L1 (measured ~7% slower at D=64).
  // (The pair path's buffers hold bf16: half as many floats.)
  const int64_t k_conv_sz =
      k_in_place ? 0 : (kTiles ? (Lk + AMX_TILE_KEYS) * D2 / 2 : (kPair ? cdiv(Lk * D2, 2) : Lk * D));
  const int64_t v_pack_sz = kTiles ? Dv * ldvt / 2 : (kPair ? Dv_pad * Lk2 / 2 : Dv_pad * Lk);
  Scratch k_conv(B * Hkv * k_conv_sz), v_pack(B * Hkv * v_pack_sz);
  if constexpr (kTiles) {
#if defined(FUSEDATTN_AMX)
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        const c10::BFloat16* kb = reinterpret_cast<const c10::BFloat16*>(k) + b * p.k_stride[0] + h * p.k_stride[1];
        uint16_t* kc = reinterpret_cast<uint16_t*>(k_conv.data() + bh * k_conv_sz);
        for (int64_t j = 0; j < Lk; ++j)
          for (int64_t d = 0; d < D; ++d) kc[j * D2 + d] = kb[j * p.k_stride[2] + d * p.k_stride[3]].x;
        std::memset(kc + Lk * D2, 0, AMX_TILE_KEYS * D2 * sizeof(uint16_t));
        const c10::BFloat16* vsrc = reinterpret_cast<const c10::BFloat16*>(v) + b * p.v_stride[0] + h * p.v_stride[1];
        uint16_t* vt = reinterpret_cast<uint16_t*>(v_pack.data() + bh * v_pack_sz);
        for (int64_t col = 0; col < Dv; ++col) {
          uint16_t* row = vt + col * ldvt;
          for (int64_t j = 0; j < Lk; ++j) row[j] = vsrc[j * p.v_stride[2] + col * p.v_stride[3]].x;
          std::memset(row + Lk, 0, (ldvt - Lk) * sizeof(uint16_t));
        }
      }
    });
#endif
  } else if constexpr (kPair) {
#if defined(__AVX512BF16__)
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        if (!k_in_place) {
          const c10::BFloat16* kb = reinterpret_cast<const c10::BFloat16*>(k) + b * p.k_stride[0] + h * p.k_stride[1];
          uint16_t* kc = reinterpret_cast<uint16_t*>(k_conv.data() + bh * k_conv_sz);
          for (int64_t j = 0; j < Lk; ++j) {
            for (int64_t d = 0; d < D; ++d) kc[j * D2 + d] = kb[j * p.k_stride[2] + d * p.k_stride[3]].x;
            if (D2 > D) kc[j * D2 + D] = 0;
          }
        }
        pack_pair_panels_rows(reinterpret_cast<const c10::BFloat16*>(v) + b * p.v_stride[0] + h * p.v_stride[1],
                              p.v_stride[2], p.v_stride[3], Lk, Dv,
                              reinterpret_cast<uint16_t*>(v_pack.data() + bh * v_pack_sz));
      }
    });
#endif
  } else {
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
    std::vector<uint16_t> qp, pb;  // bf16 paths: Q block pair panels (BM x D2), P pairs (cdiv(BN, 2) x BM x 2)
    std::vector<float> orow;       // AMX: one output row gathered from O^T
  };
  // AMX: the scores of whole 16-key tiles, P pairs of whole 32-key tiles.
  const int64_t st_rows = kTiles ? round_up(BN, AMX_ROWS) : BN;
  const int64_t pb_pairs = kTiles ? round_up(cdiv(BN, 2), AMX_ROWS) : cdiv(BN, 2);
  run_tasks(
      B * Hq * nqb,
      [&] {
        return Ctx{std::vector<float>(kBf16Ops ? 0 : std::max<int64_t>(D, 1) * BM), std::vector<float>(st_rows * BM),
                   std::vector<float>(BM * Dv_pad), std::vector<float>(BM), std::vector<float>(BM),
                   std::vector<float>(BM), std::vector<float>(BM), std::vector<float>(BM),
                   std::vector<float>(BM), std::vector<uint16_t>(kBf16Ops ? BM * D2 : 0),
                   std::vector<uint16_t>(kBf16Ops ? pb_pairs * 2 * BM : 0), std::vector<float>(kTiles ? Dv_pad : 0)};
      },
      [&](Ctx& c, int64_t t) {
        // Heaviest (last, for causal) query blocks first, heads interleaved.
        const int64_t qb = nqb - 1 - t / (B * Hq), bh = t % (B * Hq);
        const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
        const int64_t i0 = qb * BM, rows = std::min(BM, Lq - i0);
#if defined(FUSEDATTN_AMX)
        if constexpr (kTiles) amx_configure();
#endif
        if constexpr (kBf16Ops) {
          // qp: BM/NR pair panels of q[b, h, i0:i0+rows, :], unscaled (exact bf16; the scale is
          // applied to the fp32 scores)
#if defined(__AVX512BF16__)
          pack_pair_panels_cols(reinterpret_cast<const c10::BFloat16*>(q) + b * p.q_stride[0] + h * p.q_stride[1] +
                                    i0 * p.q_stride[2],
                                p.q_stride[2], p.q_stride[3], rows, D, BM / NR, c.qp.data());
#endif
        } else {
          // qt: BM/NR column panels (D x NR) of scale * q[b, h, i0:i0+rows, :] (zero beyond rows)
          pack_col_panels(q + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2], p.q_stride[2],
                          p.q_stride[3], rows, D, c.qt.data(), p.scale);
          std::fill(c.qt.begin() + cdiv(rows, NR) * D * NR, c.qt.end(), 0.f);  // lanes past the last query
        }
        std::fill(c.o.begin(), c.o.end(), 0.f);
        std::fill(c.m.begin(), c.m.end(), kNegInf);
        std::fill(c.l.begin(), c.l.end(), 0.f);
        std::fill(c.nan.begin(), c.nan.end(), 0.f);
        const int64_t bk = b * Hkv + hk;
        const float* ka = k_in_place ? reinterpret_cast<const float*>(k) + b * p.k_stride[0] + hk * p.k_stride[1]
                                     : k_conv.data() + bk * k_conv_sz;
        const int64_t ka_rs = k_in_place ? p.k_stride[2] : (kBf16Ops ? D2 : D), ka_ks = k_in_place ? p.k_stride[3] : 1;
        const float* vb = v_pack.data() + bk * v_pack_sz;
        // Pair path: K rows as bf16 (in place or the copy), V pair panels.
        [[maybe_unused]] const uint16_t* kpair =
            !kBf16Ops ? nullptr
            : k_in_place
                ? reinterpret_cast<const uint16_t*>(reinterpret_cast<const c10::BFloat16*>(k) + b * p.k_stride[0] +
                                                    hk * p.k_stride[1])
                : reinterpret_cast<const uint16_t*>(k_conv.data() + bk * k_conv_sz);
        [[maybe_unused]] const uint16_t* vpair = reinterpret_cast<const uint16_t*>(vb);
        const float* mask_b =
            p.mask.mask ? p.mask.mask + b * p.mask.mask_stride[0] + h * p.mask.mask_stride[1] : nullptr;
        // Keys any row can see; the pair path starts at an even key (V pairs are keys 2kp, 2kp+1: a
        // key before band.lo(i0) is then in the block and the band masks it).
        const int64_t n_lo = kBf16Ops ? band.lo(i0) / 2 * 2 : band.lo(i0), n_hi = band.hi(i0 + rows - 1);
        const int64_t n_panels = BM / NR;
        for (int64_t n0 = n_lo; n0 < n_hi; n0 += BN) {
          const int64_t nk = std::min(BN, n_hi - n0);  // key rows of st
          float* st = c.st.data();
          // st (nk x BM) = k[n0:n0+nk] . qt
          if constexpr (kTiles) {
#if defined(FUSEDATTN_AMX)
            // 16 keys x 64 queries per step: A = 16 K rows x 32 dims, B = the Q pair panel of 16
            // queries x 16 dim pairs (panel t / 2, vector t % 2: 128 bytes per dim pair).
            const int64_t q_panel = D2 / 2 * PAIR_PANEL;
            amx_barrier();
            for (int64_t j0 = 0; j0 < nk; j0 += AMX_ROWS) {
#define FUSEDATTN_ZERO(t) _tile_zero(t);
              FUSEDATTN_ACC_TILES(FUSEDATTN_ZERO)
#undef FUSEDATTN_ZERO
              for (int64_t d0 = 0; d0 < D; d0 += 32) {
                _tile_loadd(4, kpair + (n0 + j0) * ka_rs + d0, ka_rs * 2);
                const uint16_t* qd = c.qp.data() + d0 / 2 * PAIR_PANEL;
#define FUSEDATTN_QK(t)                                                                    \
  _tile_loadd(5, qd + ((t) / 2) * q_panel + ((t) % 2) * VL * 2, PAIR_PANEL * 2);          \
  _tile_dpbf16ps(t, 4, 5);
                FUSEDATTN_ACC_TILES(FUSEDATTN_QK)
#undef FUSEDATTN_QK
              }
#define FUSEDATTN_STORE_S(t) _tile_stored(t, st + j0 * BM + (t) * VL, BM * 4);
              FUSEDATTN_ACC_TILES(FUSEDATTN_STORE_S)
#undef FUSEDATTN_STORE_S
            }
            amx_barrier();
            const Vec sc(p.scale);
            for (int64_t x = 0; x < nk * BM; x += VL) (Vec::loadu(st + x) * sc).store(st + x);
#endif
          } else if constexpr (kPair) {
#if defined(__AVX512BF16__)
            pair_gemm(nk, n_panels, D2 / 2, kpair + n0 * ka_rs, ka_rs, 2, c.qp.data(), D2 / 2 * PAIR_PANEL, st, BM,
                      0, nullptr, p.scale);
#endif
          } else {
            gemm_panels(nk, n_panels, D, ka + n0 * ka_rs, ka_rs, ka_ks, c.qt.data(), D * NR, st, BM, 0);
          }
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
          if constexpr (kTiles) {
#if defined(FUSEDATTN_AMX)
            column_softmax_block<true>(st, nk, c.m.data(), c.l.data(), c.alpha.data(), c.nan.data(), c.pb.data());
            const int64_t pairs = cdiv(nk, 2), pairs_pad = round_up(pairs, AMX_ROWS);
            std::memset(c.pb.data() + pairs * 2 * BM, 0, (pairs_pad - pairs) * 2 * BM * sizeof(uint16_t));
            // o^T (Dv x BM) = alpha * o^T + v[n0:n0+nk]^T . p: rescale the columns, then 16 value
            // dims x 64 queries per step: A = 16 rows of V^T x 32 keys, B = 16 key pairs x 16 queries.
            float* ot = c.o.data();
            for (int64_t col = 0; col < Dv; ++col)
              for (int64_t x = 0; x < BM; x += VL)
                (Vec::loadu(ot + col * BM + x) * Vec::loadu(c.alpha.data() + x)).store(ot + col * BM + x);
            amx_barrier();
            for (int64_t c0 = 0; c0 < Dv; c0 += AMX_ROWS) {
#define FUSEDATTN_LOAD_O(t) _tile_loadd(t, ot + c0 * BM + (t) * VL, BM * 4);
              FUSEDATTN_ACC_TILES(FUSEDATTN_LOAD_O)
#undef FUSEDATTN_LOAD_O
              for (int64_t kp0 = 0; kp0 < pairs_pad; kp0 += AMX_ROWS) {
                _tile_loadd(4, vpair + c0 * ldvt + n0 + 2 * kp0, ldvt * 2);
                const uint16_t* pk = c.pb.data() + kp0 * 2 * BM;
#define FUSEDATTN_PV(t)                                    \
  _tile_loadd(5, pk + (t) * VL * 2, 2 * BM * 2);          \
  _tile_dpbf16ps(t, 4, 5);
                FUSEDATTN_ACC_TILES(FUSEDATTN_PV)
#undef FUSEDATTN_PV
              }
#define FUSEDATTN_STORE_O(t) _tile_stored(t, ot + c0 * BM + (t) * VL, BM * 4);
              FUSEDATTN_ACC_TILES(FUSEDATTN_STORE_O)
#undef FUSEDATTN_STORE_O
            }
            amx_barrier();
#endif
          } else if constexpr (kPair) {
#if defined(__AVX512BF16__)
            column_softmax_block<true>(st, nk, c.m.data(), c.l.data(), c.alpha.data(), c.nan.data(), c.pb.data());
            // o (BM x Dv_pad) = alpha * o + p^T . v[n0:n0+nk]   (n0 even: pair n0/2 of the V panels)
            pair_gemm(rows, Dv_pad / NR, cdiv(nk, 2), c.pb.data(), 2, 2 * BM, vpair + n0 / 2 * PAIR_PANEL,
                      Lk2 / 2 * PAIR_PANEL, c.o.data(), Dv_pad, 2, c.alpha.data());
#endif
          } else {
            column_softmax_block(st, nk, c.m.data(), c.l.data(), c.alpha.data(), c.nan.data());
            // o (BM x Dv_pad) = alpha * o + st^T . v[n0:n0+nk]
            gemm_panels(rows, Dv_pad / NR, nk, st, 1, BM, vb + n0 * NR, Lk * NR, c.o.data(), Dv_pad, 2,
                        c.alpha.data());
          }
        }
        const int64_t out_rs = p.out_stride[2];
        T* out_rows = out + b * p.out_stride[0] + h * p.out_stride[1] + i0 * out_rs;
        float* lse_rows = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1] + i0;
#if defined(FUSEDATTN_AMX)
        if constexpr (kTiles) _tile_release();
#endif
        for (int64_t r = 0; r < rows; ++r) {
          const float m = c.m[r], l = c.l[r];
          const float* o = c.o.data() + r * Dv_pad;
          if constexpr (kTiles) {  // row r of O is column r of O^T
            for (int64_t col = 0; col < Dv; ++col) c.orow[col] = c.o[col * BM + r];
            o = c.orow.data();
          }
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
    case InDtype::kBFloat16:
#if defined(__AVX512BF16__)
      return fwd_impl<c10::BFloat16, kPairDot>(p);
#else
      return fwd_impl<c10::BFloat16>(p);
#endif
    case InDtype::kFloat16: return fwd_impl<c10::Half>(p);
  }
}

#if defined(FUSEDATTN_AMX)
void attention_fwd_amx_kernel(const AttnFwdParams& p) {
  TORCH_CHECK(p.dtype == InDtype::kBFloat16 && p.D % 32 == 0 && p.Dv % 16 == 0,
              "fusedattn (cpu): the AMX forward takes bf16 with D % 32 == 0 and Dv % 16 == 0");
  fwd_impl<c10::BFloat16, kAmx>(p);
}
#endif

void attention_bwd_kernel(const AttnBwdParams& p) {
  switch (p.dtype) {
    case InDtype::kFloat32: return bwd_impl<float>(p);
    case InDtype::kBFloat16: return bwd_impl<c10::BFloat16>(p);
    case InDtype::kFloat16: return bwd_impl<c10::Half>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedattn::cpu
