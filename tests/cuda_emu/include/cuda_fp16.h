// CPU stand-in for <cuda_fp16.h> (kernel emulator only): IEEE half with round-to-nearest-even via _Float16.
#pragma once
#include <cstdint>
#include <cstring>
#include "cuda_runtime.h"

struct __half { uint16_t x; };
struct __half2 { __half lo, hi; };  // lo in the low 16 bits, as on the GPU
inline __half __float2half_rn(float f) {
  _Float16 h = static_cast<_Float16>(f);
  __half r;
  std::memcpy(&r.x, &h, 2);
  return r;
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.lo), __half2float(h.hi)}; }
