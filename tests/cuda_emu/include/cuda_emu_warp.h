// The warp instructions of csrc/cuda/mma_utils.cuh for the kernel emulator, written from the PTX ISA:
// "Matrix Fragments for mma.m16n8k16 with floating point type" and "ldmatrix". Included inside namespace
// fusedattn::cuda (after MmaType), only when FUSEDATTN_CUDA_EMULATE is defined.

// c += A (16x16) * B (16x8). Fragments, g = lane / 4, t = lane % 4:
//   a0 = A[g][2t..+1], a1 = A[g+8][2t..+1], a2 = A[g][2t+8..+9], a3 = A[g+8][2t+8..+9]
//   b0 = B[2t..+1][g], b1 = B[2t+8..+9][g];  c0,c1 = C[g][2t..+1], c2,c3 = C[g+8][2t..+1]
template <typename T> inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint64_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  uint64_t all[32][6];
  emu::warp_gather(mine, all);
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, t = L % 4;
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      const float2 v = MmaType<T>::unpack(static_cast<uint32_t>(all[L][i]));
      A[ar[i]][ac[i]] = v.x;
      A[ar[i]][ac[i] + 1] = v.y;
    }
    const float2 v0 = MmaType<T>::unpack(static_cast<uint32_t>(all[L][4]));
    const float2 v1 = MmaType<T>::unpack(static_cast<uint32_t>(all[L][5]));
    B[2 * t][g] = v0.x;
    B[2 * t + 1][g] = v0.y;
    B[2 * t + 8][g] = v1.x;
    B[2 * t + 9][g] = v1.y;
  }
  const int g = emu::lane_id / 4, t = emu::lane_id % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int e = 0; e < 4; ++e) {
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[rows[e]][k], B[k][cols[e]], acc);
    c[e] = acc;
  }
}

// Lanes 8i..8i+7 give the row addresses of matrix i; lane l receives row l/4, elements 2(l%4)..+1 of each
// matrix (.trans: elements (row 2(l%4), column l/4) and (row 2(l%4)+1, column l/4)).
inline void ldmatrix_emu(uint32_t (&r)[4], const void* row, bool trans) {
  const uint64_t mine[1] = {reinterpret_cast<uint64_t>(row)};
  uint64_t all[32][1];
  emu::warp_gather(mine, all);
  const int l = emu::lane_id;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(all[8 * i + l / 4][0]);
      lo = p[2 * (l % 4)];
      hi = p[2 * (l % 4) + 1];
    } else {
      lo = reinterpret_cast<const uint16_t*>(all[8 * i + 2 * (l % 4)][0])[l / 4];
      hi = reinterpret_cast<const uint16_t*>(all[8 * i + 2 * (l % 4) + 1][0])[l / 4];
    }
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { ldmatrix_emu(r, smem_row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { ldmatrix_emu(r, smem_row, true); }

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  if (valid) std::memcpy(smem_dst, gmem_src, 16);
  else std::memset(smem_dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
