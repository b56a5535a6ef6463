// Shared helpers for the CQ kernels: element conversions, packed-code extraction, launch checks.
// Layouts follow cqtool/quant.py (the spec): codes are a little-endian bit stream per (token, head) row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels.h"

namespace cq {

// The cache index of the first query: p.start, or in static decoding the one the device holds
__device__ __forceinline__ int query_start(const AttnParams& p) {
  return p.dev_start ? static_cast<int>(*p.dev_start) : p.start;
}

// Where full-precision key j (a sink, or a key of the window) lives: its key and value buffers and its row there
struct FpRow {
  FpBuf k, v;
  int64_t row;
};
__device__ __forceinline__ FpRow fp_row(const AttnParams& p, int j, int start) {
  if (j < p.n_sink) return {p.sink_k, p.sink_v, j};
  if (p.dev_start) return {p.win_k, p.win_v, j % p.win_len};  // static decoding: the window is a ring
  if (j >= start) return {p.new_k, p.new_v, j - start};         // the new tokens
  return {p.win_k, p.win_v, j - (start - p.win_len)};           // the window kept from earlier steps
}

// Dynamic shared memory above 48 KiB must be opted into per kernel with cudaFuncSetAttribute, which applies to the
// current device only: a process that runs a kernel on several GPUs (a model spread over them by device_map) opts in
// on each. One of these per kernel instantiation (a function-local static) remembers the size set on each device.
class SmemOptIn {
 public:
  static constexpr int kMaxDevices = 64;
  SmemOptIn() {
    for (size_t& b : bytes_) b = 48 << 10;
  }
  template <typename Kernel>
  cudaError_t ensure(Kernel* kernel, size_t smem) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
    if (smem <= bytes_[dev]) return cudaSuccess;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e == cudaSuccess) bytes_[dev] = smem;
    return e;
  }

 private:
  size_t bytes_[kMaxDevices];
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();


template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two packed 16-bit values (low = first) -> two floats.
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  __half2 h = *reinterpret_cast<__half2*>(&w);
  return __half22float2(h);
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  // bf16 -> fp32 is a shift: exact and cheaper than the generic conversion
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Load N (1, 2, 4 or 8) consecutive 16-bit elements as floats; p must be aligned to N*2 bytes.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  if constexpr (N == 8) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    float2 a = unpack2<T>(u.x), b = unpack2<T>(u.y), c = unpack2<T>(u.z), d = unpack2<T>(u.w);
    out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y; out[4] = c.x; out[5] = c.y; out[6] = d.x; out[7] = d.y;
  } else if constexpr (N == 4) {
    uint2 u = *reinterpret_cast<const uint2*>(p);
    float2 a = unpack2<T>(u.x), b = unpack2<T>(u.y);
    out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
  } else if constexpr (N == 2) {
    float2 a = unpack2<T>(*reinterpret_cast<const uint32_t*>(p));
    out[0] = a.x; out[1] = a.y;
  } else {
    out[0] = to_f<T>(*p);
  }
}

// Read-only global variant (ld.global.nc).
template <typename T, int N>
__device__ __forceinline__ void load_vec_g(const T* p, float* out) {
  if constexpr (N == 8) {
    uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    float2 a = unpack2<T>(u.x), b = unpack2<T>(u.y), c = unpack2<T>(u.z), d = unpack2<T>(u.w);
    out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y; out[4] = c.x; out[5] = c.y; out[6] = d.x; out[7] = d.y;
  } else if constexpr (N == 4) {
    uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    float2 a = unpack2<T>(u.x), b = unpack2<T>(u.y);
    out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
  } else if constexpr (N == 2) {
    float2 a = unpack2<T>(__ldg(reinterpret_cast<const unsigned int*>(p)));
    out[0] = a.x; out[1] = a.y;
  } else {
    unsigned short u = __ldg(reinterpret_cast<const unsigned short*>(p));
    out[0] = unpack2<T>(static_cast<uint32_t>(u)).x;
  }
}

// n / d for 0 <= n < 2^31 (FastDiv, kernels.h): a multiply-high, an add and a shift
__device__ __forceinline__ int fdiv(int n, FastDiv f) {
  return static_cast<int>((__umulhi(static_cast<uint32_t>(n), f.m) + static_cast<uint32_t>(n)) >> f.s);
}

// 2^x on the SFU (flushes denormal results to zero: fine for softmax weights).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Code at stream bit `bit` of `bits` bits from 32-bit words (little-endian stream; words[w+1] must be readable).
__device__ __forceinline__ uint32_t code_from_words(const uint32_t* words, uint32_t bit, uint32_t mask) {
  uint32_t w = bit >> 5;
  return __funnelshift_r(words[w], words[w + 1], bit & 31) & mask;
}

// Code from a byte row in global memory, reading only bytes inside the row (row_bytes long).
__device__ __forceinline__ uint32_t code_from_bytes(const uint8_t* row, int bit, int bits, int row_bytes) {
  int b0 = bit >> 3;
  uint32_t v = __ldg(row + b0);
  if (b0 + 1 < row_bytes) v |= uint32_t(__ldg(row + b0 + 1)) << 8;
  if (b0 + 2 < row_bytes) v |= uint32_t(__ldg(row + b0 + 2)) << 16;
  return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

}  // namespace cq
