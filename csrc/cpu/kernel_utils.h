// Building blocks shared by the per-ISA CPU kernels (attention_kernel.cpp, decode_kernel.cpp):
// the fp32 register-tile GEMM micro-kernel, dtype conversion on load, masking and the
// online-softmax row step, and the work-stealing task loop.
//
// Everything here lives in fusedattn::cpu::<ISA>: each ISA build has its own vector width (VL),
// so these inline functions must never be shared between the DEFAULT / AVX2 / AVX512 objects.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernel_utils.h is for the per-ISA kernel sources, compiled with -DCPU_CAPABILITY=<ISA>"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <cmath>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fusedattn::cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();  // fp32 lanes per vector
constexpr int64_t NR = 2 * VL;       // micro-tile width: 2 vectors
// Micro-tile height: MR*2 accumulators + 2 B vectors + 1 broadcast must fit the register file
// (16 ymm on AVX2 -> 6, 32 zmm on AVX-512 -> 12).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int MR = 12;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int MR = 6;
#else
constexpr int MR = 4;
#endif

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ---------------------------------------------------------------------------------------------
// Tuning knobs: environment variables for block-size experiments (the defaults are the measured
// choices; the comments where they are used say why):
//   FUSEDATTN_CPU_BLOCK_N         keys per block of the attention forward (attention_kernel.cpp,
//                                 also varlen_fwd): 1 .. 4096, rounded up to a multiple of the
//                                 micro-tile height MR (4 / 6 / 12); default 256.
//   FUSEDATTN_CPU_DECODE_BLOCK_N  keys per block of decode_fwd (decode_kernel.cpp): 1 .. 1024,
//                                 rounded up to a multiple of 16; default 32.
// Unset or empty: the default. Each is read once per process (per ISA build), at the first call
// of a kernel that uses it, before that call touches any tensor. Anything but a whole number in
// range (0, negative, too large, trailing characters) raises a RuntimeError naming the variable,
// on every call until it is fixed: the bounds keep the per-thread scratch (BLOCK_M x BLOCK_N
// floats and more) allocatable and its size arithmetic far from int64 overflow, and an error
// rather than the default keeps an experiment from measuring something other than it asked for.
// ---------------------------------------------------------------------------------------------
inline int64_t env_block_size(const char* name, int64_t dflt, int64_t max, int64_t multiple) {
  const char* s = std::getenv(name);
  if (!s || !*s) return dflt;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  TORCH_CHECK(errno == 0 && end != s && *end == '\0' && v >= 1 && v <= max, "fusedattn (cpu): the environment "
              "variable ", name, " must be a whole number in [1, ", max, "], got '", s, "' (unset it for the default ",
              dflt, ")");
  return round_up(v, multiple);
}

// ---------------------------------------------------------------------------------------------
// Register vectors. Register tiles use GCC vector extensions rather than at::vec::Vectorized:
// GCC keeps arrays of these in registers (scalar replacement), while arrays of Vectorized
// objects were spilled to the stack on every k step, halving the FMA rate.
// ---------------------------------------------------------------------------------------------
typedef float vfloat __attribute__((vector_size(VL * sizeof(float))));
static_assert(sizeof(vfloat) == sizeof(Vec), "vfloat and at::vec::Vectorized<float> must have one width");

inline vfloat load_v(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_v(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// VL elements of a float / bf16 / fp16 array as fp32 lanes: the one place a reduced-precision
// vector is widened (ATen's converters: vpmovzxwd + shift for bf16, vcvtph2ps for fp16).
inline vfloat load_cvt(const float* p) { return load_v(p); }
template <typename T, std::enable_if_t<!std::is_same_v<T, float>, int> = 0>
inline vfloat load_cvt(const T* p) {
  Vec v;
  at::vec::load_to_float<T>(p, v);
  float buf[VL];
  v.store(buf);  // folded into a register move
  return load_v(buf);
}

// A pair of fp32 vectors from 2*VL consecutive elements. Lane c of the pair (lanes VL..2VL-1
// are the second vector) holds element pair_lane<T>(c). bf16 is split into even and odd
// elements: one load and two bit operations widen 2*VL of them (an fp32 is a bf16 with 16 zero
// bits below it), against two zero-extending loads and two shifts in order. Dot products do not
// care about the order as long as both sides share it; other dtypes keep theirs.
inline void load_pair(const float* p, vfloat& a, vfloat& b) {
  a = load_v(p);
  b = load_v(p + VL);
}
inline void load_pair(const c10::Half* p, vfloat& a, vfloat& b) {
  a = load_cvt(p);
  b = load_cvt(p + VL);
}
inline void load_pair(const c10::BFloat16* p, vfloat& a, vfloat& b) {
  typedef uint32_t vu32 __attribute__((vector_size(VL * sizeof(uint32_t))));
  vu32 x;
  std::memcpy(&x, p, sizeof(x));  // 2*VL bf16, element 2i in the low half of 32-bit lane i
  const vu32 even = x << 16, odd = x & 0xFFFF0000u;
  std::memcpy(&a, &even, sizeof(a));
  std::memcpy(&b, &odd, sizeof(b));
}
template <typename T>
constexpr int64_t pair_lane(int64_t c) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return c < VL ? 2 * c : 2 * (c - VL) + 1;
  return c;
}
// The lane masks of the pair-order shuffles: pair_mask(0) picks the even elements of the 2*VL-lane
// concatenation of two vectors, pair_mask(1) the odd ones; interleave_mask(h) interleaves the
// lower (h = 0) or upper (h = 1) halves of two vectors.
typedef int32_t vi32 __attribute__((vector_size(VL * sizeof(int32_t))));
template <std::size_t... I>
constexpr vi32 pair_mask_impl(int32_t odd, std::index_sequence<I...>) {
  return vi32{static_cast<int32_t>(2 * I + odd)...};
}
constexpr vi32 pair_mask(int32_t odd) { return pair_mask_impl(odd, std::make_index_sequence<VL>{}); }
template <std::size_t... I>
constexpr vi32 interleave_mask_impl(int32_t half, std::index_sequence<I...>) {
  return vi32{static_cast<int32_t>(half * VL / 2 + I / 2 + (I % 2) * VL)...};
}
constexpr vi32 interleave_mask(int32_t half) { return interleave_mask_impl(half, std::make_index_sequence<VL>{}); }

// In place: row[d .. d+2VL) rearranged into pair_lane order, for each whole pair in [0, n).
// Two vector shuffles per pair (a scalar gather through a buffer cost ~3 us per decode task:
// the vector reload of 16 scalar stores cannot be store-forwarded).
template <typename T>
inline void to_pair_order(float* row, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t d = 0; d + 2 * VL <= n; d += 2 * VL) {
#if defined(__clang__)  // no __builtin_shuffle: through a buffer
      float tmp[2 * VL];
      for (int64_t c = 0; c < 2 * VL; ++c) tmp[c] = row[d + pair_lane<T>(c)];
      std::copy(tmp, tmp + 2 * VL, row + d);
#else
      const vfloat a = load_v(row + d), b = load_v(row + d + VL);
      store_v(row + d, __builtin_shuffle(a, b, pair_mask(0)));
      store_v(row + d + VL, __builtin_shuffle(a, b, pair_mask(1)));
#endif
    }
  }
}
// dst[0..n) = src[0..n) back in element order (the inverse of to_pair_order).
template <typename T>
inline void from_pair_order(const float* src, int64_t n, float* dst) {
  int64_t d = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    for (; d + 2 * VL <= n; d += 2 * VL) {
#if defined(__clang__)
      for (int64_t c = 0; c < 2 * VL; ++c) dst[d + pair_lane<T>(c)] = src[d + c];
#else
      const vfloat even = load_v(src + d), odd = load_v(src + d + VL);
      store_v(dst + d, __builtin_shuffle(even, odd, interleave_mask(0)));
      store_v(dst + d + VL, __builtin_shuffle(even, odd, interleave_mask(1)));
#endif
    }
  std::copy(src + d, src + n, dst + d);
}

// sums[i] = the sum of the lanes of a[i], for 8 vectors at once: a transposing reduction
// (3 levels of pairwise shuffles and adds) costs a third of 8 separate horizontal sums.
inline void reduce8(const vfloat* a, float* sums) {
  typedef float v8f __attribute__((vector_size(8 * sizeof(float))));
  v8f x[8];
  for (int i = 0; i < 8; ++i) {
    float buf[VL];
    store_v(buf, a[i]);
    v8f lo;
    std::memcpy(&lo, buf, sizeof(lo));
    if constexpr (VL == 16) {  // fold the upper 8 lanes onto the lower 8
      v8f hi;
      std::memcpy(&hi, buf + 8, sizeof(hi));
      lo += hi;
    }
    x[i] = lo;
  }
  auto hadd = [](v8f p, v8f q) {  // vhaddps: [p0+p1, p2+p3, q0+q1, q2+q3, p4+p5, p6+p7, q4+q5, q6+q7]
    return __builtin_shufflevector(p, q, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(p, q, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const v8f u0 = hadd(hadd(x[0], x[1]), hadd(x[2], x[3]));  // [s0..s3 of lanes 0-3 | s0..s3 of lanes 4-7]
  const v8f u1 = hadd(hadd(x[4], x[5]), hadd(x[6], x[7]));
  const v8f r = __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
  std::memcpy(sums, &r, sizeof(r));
}

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

// ---------------------------------------------------------------------------------------------
// GEMM micro-kernel.  C[MxNR] (=|+=) A[MxK] * B[KxNR]
//   A element (r, k) at A[r*a_rs + k*a_ks]  (row-major: a_rs=lda, a_ks=1; transposed: a_rs=1)
//   B is read through a loader: b.load2(k, b0, b1) gives row k's NR columns as two vectors.
//   mode 0: C = AB;  mode 1: C += AB;  mode 2: C = row_scale[r]*C + AB (online-softmax rescale)
// ---------------------------------------------------------------------------------------------

// B = one packed panel: K rows of NR contiguous floats.
struct PackedPanel {
  const float* p;
  void load2(int64_t k, vfloat& b0, vfloat& b1) const { load_pair(p + k * NR, b0, b1); }
};

template <int M, typename BSrc>
inline void micro_kernel(int64_t K, const float* __restrict A, int64_t a_rs, int64_t a_ks, const BSrc& b,
                         float* __restrict C, int64_t ldc, int mode, const float* row_scale) {
  vfloat c0[M], c1[M];
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    c0[r] = vfloat{};
    c1[r] = vfloat{};
  }
  // Two k steps per loop trip: decode (K = 8 keys per call) 3% faster, prefill unchanged; a full
  // unroll by 8 made decode 3% slower.
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    vfloat b0, b1;
    b.load2(k, b0, b1);
    const float* a = A + k * a_ks;
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const float av = a[r * a_rs];
      c0[r] += av * b0;  // contracted to FMA (-ffp-contract=fast)
      c1[r] += av * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    float* c = C + r * ldc;
    if (mode == 0) {
      store_v(c, c0[r]);
      store_v(c + VL, c1[r]);
    } else {
      vfloat o0 = load_v(c), o1 = load_v(c + VL);
      if (mode == 2) {
        o0 *= row_scale[r];
        o1 *= row_scale[r];
      }
      store_v(c, o0 + c0[r]);
      store_v(c + VL, o1 + c1[r]);
    }
  }
}

template <int M, typename BSrc>
inline void micro_dispatch(int m, int64_t K, const float* A, int64_t a_rs, int64_t a_ks, const BSrc& b,
                           float* C, int64_t ldc, int mode, const float* rs) {
  if constexpr (M > 0) {
    if (m == M) return micro_kernel<M>(K, A, a_rs, a_ks, b, C, ldc, mode, rs);
    return micro_dispatch<M - 1>(m, K, A, a_rs, a_ks, b, C, ldc, mode, rs);
  }
}

// C[M x (n_panels*NR)] op= A[M x K] * B, where panel_src(p) is the loader of B's columns
// p*NR .. p*NR+NR. Panel-outer order keeps one B panel in L1 while the A rows stream through.
template <typename PanelSrc>
inline void gemm_tiles(int64_t M, int64_t n_panels, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                       PanelSrc&& panel_src, float* C, int64_t ldc, int mode, const float* row_scale) {
  if (M <= 0 || n_panels <= 0) return;
  if (K == 0) {  // empty reduction: C = 0 (mode 0) or unchanged apart from the rescale
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < n_panels * NR; ++c) {
        float& x = C[r * ldc + c];
        x = mode == 0 ? 0.f : (mode == 2 ? x * row_scale[r] : x);
      }
    return;
  }
  for (int64_t p = 0; p < n_panels; ++p) {
    const auto b = panel_src(p);
    float* c = C + p * NR;
    int64_t r = 0;
    for (; r + MR <= M; r += MR)
      micro_kernel<MR>(K, A + r * a_rs, a_rs, a_ks, b, c + r * ldc, ldc, mode,
                       row_scale ? row_scale + r : nullptr);
    if (r < M)
      micro_dispatch<MR - 1>(static_cast<int>(M - r), K, A + r * a_rs, a_rs, a_ks, b, c + r * ldc, ldc, mode,
                             row_scale ? row_scale + r : nullptr);
  }
}

// B packed as n_panels panels (panel p at Bp + p*panel_stride, K rows of NR floats).
inline void gemm_panels(int64_t M, int64_t n_panels, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                        const float* Bp, int64_t panel_stride, float* C, int64_t ldc, int mode,
                        const float* row_scale = nullptr) {
  gemm_tiles(M, n_panels, K, A, a_rs, a_ks, [&](int64_t p) { return PackedPanel{Bp + p * panel_stride}; }, C,
             ldc, mode, row_scale);
}

// ---------------------------------------------------------------------------------------------
// Loading and storing rows.
// ---------------------------------------------------------------------------------------------

// dst[i*ld_dst + d] = scale * src[i*rs + d*cs] for i < rows, d < cols; zero for cols..ld_pad.
template <typename T>
void load_rows(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float scale, float* dst,
               int64_t ld_dst, int64_t ld_pad) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * rs;
    float* d = dst + i * ld_dst;
    if (cs == 1) {
      if constexpr (std::is_same_v<T, float>) {
        at::vec::map([scale](Vec x) { return x * Vec(scale); }, d, s, cols);
      } else {
        for (int64_t c = 0; c < cols; ++c) d[c] = scale * to_f(s[c]);
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = scale * to_f(s[c * cs]);
    }
    for (int64_t c = cols; c < ld_pad; ++c) d[c] = 0.f;
  }
}

template <typename T>
inline void store_row(const float* src, float mul, T* dst, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c] * mul);
}

// ---------------------------------------------------------------------------------------------
// Visibility: row i sees keys [lo(i), hi(i)) (clipped to [0, Lk)), then the additive mask.
//   Query i, key j, off = Lk - Lq (bottom-right) or 0 (top-left):
//   visible  <=>  i + off - left <= j <= i + off + right   (-1 = unbounded side)
// ---------------------------------------------------------------------------------------------
struct Band {
  int64_t Lk, off, left, right;
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + off - left); }
  int64_t hi(int64_t i) const {
    return right < 0 ? Lk : std::min<int64_t>(Lk, std::max<int64_t>(0, i + off + right + 1));
  }
};

// softcap: s <- cap * tanh(s / cap) over a whole scores row (width a multiple of VL).
inline void apply_softcap(float* s, int64_t width, float cap) {
  const Vec capv(cap), inv(1.f / cap);
  for (int64_t c = 0; c < width; c += VL) ((Vec::loadu(s + c) * inv).tanh() * capv).store(s + c);
}

// One scores row s[0..width) for keys n0..n0+width (width a multiple of NR): add the additive
// mask to the n_valid keys that exist, then -inf outside [lo, hi) (both relative to n0).
// mask_hides (a bool mask's 0 / -inf): a -inf entry sets the score to -inf instead of adding.
inline void mask_scores_row(float* s, int64_t width, int64_t n_valid, int64_t lo, int64_t hi,
                            const float* mask_row, bool mask_hides = false) {
  if (mask_row && mask_hides) {
    for (int64_t c = 0; c < n_valid; ++c) s[c] = mask_row[c] == kNegInf ? kNegInf : s[c];
  } else if (mask_row) {
    int64_t c = 0;
    for (; c + VL <= n_valid; c += VL) (Vec::loadu(s + c) + Vec::loadu(mask_row + c)).store(s + c);
    for (; c < n_valid; ++c) s[c] += mask_row[c];
  }
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, n_valid);
  if (hi <= lo) lo = hi = 0;
  for (int64_t c = 0; c < lo; ++c) s[c] = kNegInf;
  for (int64_t c = hi; c < width; ++c) s[c] = kNegInf;
}

inline float row_max(const float* s, int64_t width) {
  Vec m(kNegInf);
  for (int64_t c = 0; c < width; c += VL) m = at::vec::maximum(m, Vec::loadu(s + c));  // NaN-propagating
  float buf[VL];
  m.store(buf);
  float r = kNegInf;
  for (int64_t c = 0; c < VL; ++c) r = (std::isnan(buf[c]) || std::isnan(r)) ? NAN : std::max(r, buf[c]);
  return r;
}

// s <- exp(s - m) in place; returns the sum. exp_u20: ATen's fast exp (<= 20 ulp), exp(-inf) = 0.
inline float exp_sub_sum(float* s, int64_t width, float m) {
  const Vec mv(m);
  Vec acc(0.f);
  for (int64_t c = 0; c < width; c += VL) {
    Vec e = (Vec::loadu(s + c) - mv).exp_u20();
    e.store(s + c);
    acc = acc + e;
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// ---------------------------------------------------------------------------------------------
// Online softmax, one query row at a time. State: running max m (-inf before any visible key),
// running sum l of exp(s - m), and the unnormalized output o.
// ---------------------------------------------------------------------------------------------

// Folds one block's masked scores row s[0..width) into (m, l): leaves p = exp(s - m_new) in s and
// sets alpha = exp(m_old - m_new), the factor by which o must be rescaled before adding p.V.
// Returns false when the row has seen nothing visible yet (s zeroed, alpha 1) or a NaN score (m
// becomes NaN and the row is reported as NaN at the end).
inline bool softmax_update_row(float* s, int64_t width, float& m, float& l, float& alpha) {
  const float rm = row_max(s, width), m_old = m;
  const float m_new = (std::isnan(rm) || std::isnan(m_old)) ? NAN : std::max(m_old, rm);
  if (!(m_new > kNegInf)) {
    if (std::isnan(m_new)) m = NAN;
    std::fill(s, s + width, 0.f);
    alpha = 1.f;
    return false;
  }
  alpha = std::exp(m_old - m_new);  // exp(-inf) = 0 on the first visible block
  l = l * alpha + exp_sub_sum(s, width, m_new);
  m = m_new;
  return true;
}

// Writes out = o / l and lse = m + log(l) for one row; a row that saw no key gives 0 and -inf.
template <typename T>
inline void finish_row(const float* o, float m, float l, T* out, int64_t Dv, float* lse) {
  if (std::isnan(m)) {
    store_row(o, NAN, out, Dv);
    *lse = NAN;
  } else if (l > 0.f) {
    store_row(o, 1.f / l, out, Dv);
    *lse = m + std::log(l);
  } else {  // fully masked row: output 0, lse -inf
    store_row(o, 0.f, out, Dv);
    *lse = kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------
// Work-stealing loop: tasks [0, n) handed out one at a time to at::parallel_for's threads.
// ---------------------------------------------------------------------------------------------
template <typename Init, typename Body>
void run_tasks(int64_t n, Init&& init, Body&& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    auto ctx = init();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(ctx, t);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedattn::cpu
