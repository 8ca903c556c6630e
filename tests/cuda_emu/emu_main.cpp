// Runs the CUDA kernels of csrc/cuda on the CPU through the emulator in include/ (see cuda_runtime.h there) and
// compares them with a float64 reference computed here: forward (out, lse), backward (dq, dk, dv) and split-KV
// decode over a paged cache with an in-place append. Built and run by tests/test_cuda_emulated.py:
//   g++ -std=c++20 -O2 -pthread -DFUSEDATTN_CUDA_EMULATE -Itests/cuda_emu/include -Icsrc emu_main.cpp
//   ./a.out        -> one line per case, exit status 1 if any case is off
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "cuda/decode.cuh"
#include "cuda/flash_bwd.cuh"
#include "cuda/flash_fwd.cuh"

namespace fusedattn::cuda {
alignas(128) unsigned char smem_raw[256 * 1024];
}
using namespace fusedattn::cuda;

// Runs kernel() for every CTA of `grid`, one OS thread per CUDA thread. Shared memory starts as 0xFF bytes
// (NaN in fp16 / bf16 / fp32), so a read of a shared element nobody wrote shows up as NaN.
static void launch(dim3 grid, int threads, const std::function<void()>& kernel) {
  emu::gDim = grid;
  emu::bDim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(smem_raw, 0xFF, sizeof(smem_raw));
        std::barrier<> cta(threads);
        emu::cta_barrier = &cta;
        emu::warp_barriers.clear();
        for (int w = 0; w < (threads + 31) / 32; ++w) emu::warp_barriers.emplace_back(new std::barrier<>(32));
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            emu::tIdx = dim3(t);
            emu::bIdx = dim3(x, y, z);
            emu::lane_id = t % 32;
            emu::warp_id = t / 32;
            kernel();
          });
        for (auto& th : ts) th.join();
      }
}

template <typename T> T to_t(float f);
template <> __half to_t<__half>(float f) { return __float2half_rn(f); }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
static float to_f(__half h) { return __half2float(h); }
static float to_f(__nv_bfloat16 h) { return __bfloat162float(h); }

static std::mt19937 rng(1234);
template <typename T> std::vector<T> random_t(size_t n, float scale = 1.f) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = to_t<T>(nd(rng));
  return v;
}

static int failures = 0;
// max |got - ref| <= tol * max(1, max |ref|); equal infinities agree; NaN never does.
static void expect(const char* what, const std::vector<double>& got, const std::vector<double>& ref, double tol) {
  double err = 0, mx = 1;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isfinite(ref[i])) mx = std::max(mx, std::fabs(ref[i]));
    double e = (got[i] == ref[i]) ? 0 : std::fabs(got[i] - ref[i]);
    if (std::isnan(got[i]) || std::isnan(e)) e = INFINITY;
    err = std::max(err, e);
  }
  const bool ok = err <= tol * mx;
  if (!ok) ++failures;
  std::printf("    %-4s max err %.3e (bound %.3e) %s\n", what, err, tol * mx, ok ? "ok" : "FAIL");
}

struct Case {
  int B, Hq, Hkv, Lq, Lk;
  int64_t wl, wr;
  bool bottom_right;
};

static bool visible(const Case& c, int64_t i, int64_t j) {
  const int64_t off = c.bottom_right ? c.Lk - c.Lq : 0;
  return (c.wl < 0 || j >= i + off - c.wl) && (c.wr < 0 || j <= i + off + c.wr);
}

template <typename T, int D> void run_attention(const Case& c, bool with_grad_lse) {
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, Lq = c.Lq, Lk = c.Lk, G = Hq / Hkv;
  const float scale = 1.f / std::sqrt(float(D));
  std::printf("attention %s D=%d B=%d Hq=%d Hkv=%d Lq=%d Lk=%d window=(%lld,%lld) %s\n",
              sizeof(T) == 2 && std::is_same_v<T, __half> ? "fp16" : "bf16", D, B, Hq, Hkv, Lq, Lk,
              (long long)c.wl, (long long)c.wr, c.bottom_right ? "bottom-right" : "top-left");
  auto q = random_t<T>(size_t(B) * Hq * Lq * D), k = random_t<T>(size_t(B) * Hkv * Lk * D),
       v = random_t<T>(size_t(B) * Hkv * Lk * D), dout = random_t<T>(size_t(B) * Hq * Lq * D);
  std::vector<float> glse(size_t(B) * Hq * Lq, 0.f);
  if (with_grad_lse) {
    std::normal_distribution<float> nd;
    for (auto& x : glse) x = nd(rng);
  }
  auto Q = [&](int b, int h, int i, int d) { return double(to_f(q[((size_t(b) * Hq + h) * Lq + i) * D + d])); };
  auto K = [&](int b, int h, int j, int d) { return double(to_f(k[((size_t(b) * Hkv + h) * Lk + j) * D + d])); };
  auto V = [&](int b, int h, int j, int d) { return double(to_f(v[((size_t(b) * Hkv + h) * Lk + j) * D + d])); };
  auto dO = [&](int b, int h, int i, int d) { return double(to_f(dout[((size_t(b) * Hq + h) * Lq + i) * D + d])); };

  // ---- float64 reference
  std::vector<double> out_ref(q.size(), 0), lse_ref(glse.size()), dq_ref(q.size(), 0), dk_ref(k.size(), 0),
      dv_ref(v.size(), 0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / G;
      for (int i = 0; i < Lq; ++i) {
        std::vector<double> s(Lk, -INFINITY);
        double m = -INFINITY;
        for (int j = 0; j < Lk; ++j)
          if (visible(c, i, j)) {
            double dot = 0;
            for (int d = 0; d < D; ++d) dot += Q(b, h, i, d) * K(b, hk, j, d);
            s[j] = dot * scale;
            m = std::max(m, s[j]);
          }
        const size_t row = (size_t(b) * Hq + h) * Lq + i;
        if (m == -INFINITY) {
          lse_ref[row] = -INFINITY;
          continue;
        }
        double l = 0;
        for (int j = 0; j < Lk; ++j) l += std::exp(s[j] - m);
        lse_ref[row] = m + std::log(l);
        std::vector<double> p(Lk);
        for (int j = 0; j < Lk; ++j) p[j] = std::exp(s[j] - lse_ref[row]);
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (int j = 0; j < Lk; ++j) o += p[j] * V(b, hk, j, d);
          out_ref[row * D + d] = o;
        }
        double delta = -glse[row];
        for (int d = 0; d < D; ++d) delta += dO(b, h, i, d) * out_ref[row * D + d];
        for (int j = 0; j < Lk; ++j) {
          if (p[j] == 0) continue;
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += dO(b, h, i, d) * V(b, hk, j, d);
          const double ds = p[j] * (dp - delta);
          for (int d = 0; d < D; ++d) {
            dq_ref[row * D + d] += scale * ds * K(b, hk, j, d);
            dk_ref[((size_t(b) * Hkv + hk) * Lk + j) * D + d] += scale * ds * Q(b, h, i, d);
            dv_ref[((size_t(b) * Hkv + hk) * Lk + j) * D + d] += p[j] * dO(b, h, i, d);
          }
        }
      }
    }

  // ---- forward kernel
  std::vector<T> out(q.size());
  std::vector<float> lse(glse.size());
  AttnFwdParams p{};
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.Lk = Lk; p.D = D;
  p.q = q.data(); p.k = k.data(); p.v = v.data();
  const int64_t qs[4] = {int64_t(Hq) * Lq * D, int64_t(Lq) * D, D, 1}, ks[4] = {int64_t(Hkv) * Lk * D, int64_t(Lk) * D, D, 1};
  for (int d = 0; d < 4; ++d) { p.q_stride[d] = qs[d]; p.k_stride[d] = ks[d]; p.v_stride[d] = ks[d]; }
  p.out = out.data(); p.lse = lse.data(); p.scale = scale;
  p.window_left = c.wl; p.window_right = c.wr; p.diag_offset = c.bottom_right ? Lk - Lq : 0;
  using FC = FwdConfig<D>;
  launch(dim3((Lq + FC::BLOCK_M - 1) / FC::BLOCK_M, Hq, B), FC::NWARPS * 32, [&] { attention_fwd_kernel<T, D>(p); });
  std::vector<double> out_d(out.size()), lse_d(lse.begin(), lse.end());
  for (size_t i = 0; i < out.size(); ++i) out_d[i] = to_f(out[i]);
  const double tol = std::is_same_v<T, __half> ? 4e-3 : 2.5e-2;
  expect("out", out_d, out_ref, tol);
  expect("lse", lse_d, lse_ref, 1e-3);

  // ---- backward kernels (delta from the kernel's own output, as bindings.cpp does)
  std::vector<float> delta(glse.size());
  for (size_t r = 0; r < delta.size(); ++r) {
    double s = -glse[r];
    for (int d = 0; d < D; ++d) s += double(to_f(dout[r * D + d])) * to_f(out[r * D + d]);
    delta[r] = float(s);
  }
  std::vector<T> dq(q.size()), dk(k.size()), dv(v.size());
  AttnBwdParams bp{};
  bp.B = B; bp.Hq = Hq; bp.Hkv = Hkv; bp.Lq = Lq; bp.Lk = Lk; bp.D = D;
  bp.q = q.data(); bp.k = k.data(); bp.v = v.data(); bp.dout = dout.data();
  for (int d = 0; d < 4; ++d) { bp.q_stride[d] = qs[d]; bp.k_stride[d] = ks[d]; bp.v_stride[d] = ks[d]; bp.dout_stride[d] = qs[d]; }
  bp.lse = lse.data(); bp.delta = delta.data(); bp.dq = dq.data(); bp.dk = dk.data(); bp.dv = dv.data();
  bp.scale = scale; bp.window_left = c.wl; bp.window_right = c.wr; bp.diag_offset = p.diag_offset;
  using BC = BwdConfig<D>;
  const dim3 grid_kv((Lk + BC::KV_BLOCK_N - 1) / BC::KV_BLOCK_N, Hkv, B);
  if constexpr (BC::KV_TWO_PASS) {
    launch(grid_kv, BC::NWARPS * 32, [&] { attention_bwd_dkdv_kernel<T, D, false, true>(bp); });
    launch(grid_kv, BC::NWARPS * 32, [&] { attention_bwd_dkdv_kernel<T, D, true, false>(bp); });
  } else {
    launch(grid_kv, BC::NWARPS * 32, [&] { attention_bwd_dkdv_kernel<T, D, true, true>(bp); });
  }
  launch(dim3((Lq + BC::Q_BLOCK_M - 1) / BC::Q_BLOCK_M, Hq, B), BC::NWARPS * 32,
         [&] { attention_bwd_dq_kernel<T, D>(bp); });
  auto as_d = [](const std::vector<T>& x) {
    std::vector<double> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = to_f(x[i]);
    return r;
  };
  const double gtol = std::is_same_v<T, __half> ? 1e-2 : 5e-2;
  expect("dq", as_d(dq), dq_ref, gtol);
  expect("dk", as_d(dk), dk_ref, gtol);
  expect("dv", as_d(dv), dv_ref, gtol);
}

// Paged decode: sequences of `lens` keys after appending Lnew rows; unused slots are NaN and unused block-table
// entries out of range, so reading past a sequence shows up.
template <typename T, int D>
void run_decode(std::vector<int> lens, int Lq, int Hq, int Hkv, int page, int Lnew, int splits, int64_t wl,
                int64_t wr) {
  const int B = int(lens.size()), G = Hq / Hkv;
  std::printf("decode D=%d Lq=%d Hq=%d Hkv=%d page=%d Lnew=%d splits=%d window=(%lld,%lld)\n", D, Lq, Hq, Hkv, page,
              Lnew, splits, (long long)wl, (long long)wr);
  std::vector<int> cached(B), pages(B);
  int max_pages = 0, num_blocks = 3;
  for (int b = 0; b < B; ++b) {
    cached[b] = std::max(lens[b] - Lnew, 0);
    pages[b] = (cached[b] + Lnew + page - 1) / page;
    max_pages = std::max(max_pages, pages[b]);
    num_blocks += pages[b];
  }
  const int max_blocks = max_pages + 1;
  std::vector<int32_t> order(num_blocks);
  for (int i = 0; i < num_blocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> table(size_t(B) * max_blocks, -7);
  for (int b = 0, n = 0; b < B; ++b)
    for (int i = 0; i < pages[b]; ++i) table[size_t(b) * max_blocks + i] = order[n++];
  const size_t row = size_t(Hkv) * D;
  std::vector<T> kc(size_t(num_blocks) * page * row, to_t<T>(NAN)), vc = kc;
  auto keys = random_t<T>(size_t(B) * (*std::max_element(lens.begin(), lens.end()) + Lnew) * row);
  auto vals = random_t<T>(keys.size());
  const size_t seq_stride = keys.size() / B;
  auto slot = [&](int b, int j) { return (size_t(table[size_t(b) * max_blocks + j / page]) * page + j % page) * row; };
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < cached[b]; ++j)
      for (size_t e = 0; e < row; ++e) {
        kc[slot(b, j) + e] = keys[b * seq_stride + j * row + e];
        vc[slot(b, j) + e] = vals[b * seq_stride + j * row + e];
      }
  std::vector<T> kn(size_t(B) * Lnew * row), vn(kn.size());
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < Lnew; ++t)
      for (size_t e = 0; e < row; ++e) {
        kn[(size_t(b) * Lnew + t) * row + e] = keys[b * seq_stride + (cached[b] + t) * row + e];
        vn[(size_t(b) * Lnew + t) * row + e] = vals[b * seq_stride + (cached[b] + t) * row + e];
      }
  auto q = random_t<T>(size_t(B) * Lq * Hq * D);
  const float scale = 1.f / std::sqrt(float(D));

  std::vector<double> out_ref(q.size(), 0), lse_ref(size_t(B) * Hq * Lq);
  for (int b = 0; b < B; ++b) {
    const int Lk = cached[b] + Lnew;
    for (int i = 0; i < Lq; ++i)
      for (int h = 0; h < Hq; ++h) {
        const int hk = h / G;
        const int64_t pos = Lk - Lq + i;
        std::vector<double> s(Lk, -INFINITY);
        double m = -INFINITY;
        for (int j = 0; j < Lk; ++j) {
          if ((wl >= 0 && j < pos - wl) || (wr >= 0 && j > pos + wr)) continue;
          double dot = 0;
          for (int d = 0; d < D; ++d)
            dot += double(to_f(q[((size_t(b) * Lq + i) * Hq + h) * D + d])) *
                   to_f(keys[b * seq_stride + j * row + hk * D + d]);
          s[j] = dot * scale;
          m = std::max(m, s[j]);
        }
        const size_t lrow = (size_t(b) * Hq + h) * Lq + i;
        if (m == -INFINITY) { lse_ref[lrow] = -INFINITY; continue; }
        double l = 0;
        for (int j = 0; j < Lk; ++j) l += std::exp(s[j] - m);
        lse_ref[lrow] = m + std::log(l);
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (int j = 0; j < Lk; ++j)
            if (s[j] > -INFINITY) o += std::exp(s[j] - lse_ref[lrow]) * to_f(vals[b * seq_stride + j * row + hk * D + d]);
          out_ref[((size_t(b) * Lq + i) * Hq + h) * D + d] = o;
        }
      }
  }

  std::vector<int32_t> seqlens(cached.begin(), cached.end());
  std::vector<float> out_part(size_t(splits) * q.size()), lse_part(size_t(splits) * lse_ref.size()),
      lse(lse_ref.size());
  std::vector<T> out(q.size());
  DecodeParams p{};
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.D = D;
  p.q = q.data();
  const int64_t qs[4] = {int64_t(Lq) * Hq * D, int64_t(Hq) * D, D, 1}, cs[4] = {int64_t(page) * int64_t(row), int64_t(row), D, 1},
                ns[4] = {int64_t(Lnew) * int64_t(row), int64_t(row), D, 1};
  for (int d = 0; d < 4; ++d) { p.q_stride[d] = qs[d]; p.k_stride[d] = cs[d]; p.v_stride[d] = cs[d]; p.kn_stride[d] = ns[d]; p.vn_stride[d] = ns[d]; }
  p.k_cache = kc.data(); p.v_cache = vc.data();
  p.cache_rows = num_blocks; p.capacity = int64_t(max_blocks) * page;
  p.cache_seqlens = seqlens.data(); p.cache_batch_idx = nullptr; p.block_table = table.data();
  p.max_blocks = max_blocks; p.page_size = page;
  p.k_new = Lnew ? kn.data() : nullptr; p.v_new = Lnew ? vn.data() : nullptr; p.Lnew = Lnew;
  p.scale = scale; p.softcap = 0.f; p.window_left = wl; p.window_right = wr; p.num_splits = splits;
  p.out_partial = out_part.data(); p.lse_partial = lse_part.data(); p.out = out.data(); p.lse = lse.data();
  if (Lnew) {
    const int64_t n = int64_t(B) * Lnew * Hkv * D;
    launch(dim3(unsigned((n + 255) / 256)), 256, [&] { decode_append_kernel<T, D>(p); });
  }
  using DC = DecodeConfig<D>;
  const int64_t chunks = (int64_t(Lq) * G + DC::ROWS_PER_CTA - 1) / DC::ROWS_PER_CTA;
  launch(dim3(unsigned(splits * chunks), Hkv, B), DC::NWARPS * 32, [&] { decode_split_kv_kernel<T, D>(p); });
  launch(dim3(unsigned((int64_t(B) * Lq * Hq + 3) / 4)), 128, [&] { decode_combine_kernel<T, D>(p); });
  std::vector<double> out_d(out.size()), lse_d(lse.begin(), lse.end());
  for (size_t i = 0; i < out.size(); ++i) out_d[i] = to_f(out[i]);
  expect("out", out_d, out_ref, std::is_same_v<T, __half> ? 4e-3 : 2.5e-2);
  expect("lse", lse_d, lse_ref, 1e-3);
  // the append wrote the new rows where the reference has them
  bool appended = true;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < Lnew; ++t)
      for (size_t e = 0; e < row; ++e)
        appended &= std::memcmp(&kc[slot(b, cached[b] + t) + e], &kn[(size_t(b) * Lnew + t) * row + e], sizeof(T)) == 0;
  if (!appended) ++failures;
  std::printf("    append %s\n", appended ? "ok" : "FAIL");
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  // Forward + backward: odd lengths across tile edges, GQA, causal both alignments, windows, rows that see nothing.
  run_attention<__nv_bfloat16, 64>({1, 4, 2, 97, 130, -1, 0, true}, true);    // causal bottom-right, GQA 2
  run_attention<__half, 128>({1, 2, 2, 70, 33, -1, 0, true}, false);          // Lq > Lk: 37 rows see nothing
  run_attention<__half, 64>({2, 2, 1, 17, 97, -1, -1, true}, false);          // no mask, MQA, B = 2
  run_attention<__nv_bfloat16, 256>({1, 2, 1, 65, 90, -1, 0, false}, true);   // causal top-left, two-pass dK/dV
  if (!quick) {
    run_attention<__half, 64>({1, 2, 2, 129, 129, 7, 21, true}, false);       // sliding window
    run_attention<__nv_bfloat16, 128>({1, 2, 1, 1, 200, 30, 0, true}, true);  // one query row, window + causal
    run_attention<__half, 256>({1, 1, 1, 33, 47, 0, 0, true}, false);         // diagonal only: some rows empty
    run_attention<__nv_bfloat16, 128>({1, 2, 2, 200, 150, -1, 0, false}, false);  // two 128-row blocks, top-left
  }
  // Decode: paged cache (page sizes 1, 16, 64), append, GQA, split-KV, window.
  run_decode<__nv_bfloat16, 128>({1, 7, 257}, 1, 8, 2, 16, 3, 3, -1, 0);
  run_decode<__half, 64>({0, 40, 130}, 4, 4, 2, 1, 0, 2, -1, 0);
  run_decode<__nv_bfloat16, 256>({5, 100}, 2, 20, 1, 64, 2, 1, 16, 0);  // 40 rows per kv head: two row chunks
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
