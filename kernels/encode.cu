// Encode: nearest centroid (squared L2, fp32, first index on ties, as quant.encode) for new K/V tokens, packed
// into the preallocated code buffer in place: codes[b, h, start + t, :] for t < Q (or at rows[t], a device array, when
// given: static decoding, whose rows the host does not know when a CUDA graph replays). Old tokens are untouched.
//
//   x:         [B, H, Q, D] fp16/bf16, any strides with a contiguous last dim
//   centroids: [H, G, K, c] same dtype, contiguous (K = 2**bits)
//   codes:     [B, H, cap, R] uint8, contiguous, R = ceil(G * bits / 8)
#include "common.cuh"
#include "kernels.h"

namespace cq {
namespace {

constexpr int kEncMaxWarps = 16;

// One block per (token, head) row; warps take groups (one warp per group up to 16 groups: at one token per sequence
// only B x H blocks run, and each warp's walk over its centroids is a chain of L2 loads, so more warps per block
// shorten the launch), lanes take centroids, then the row's bytes are assembled.
template <typename T, int C>
__global__ void __launch_bounds__(kEncMaxWarps * 32) encode_kernel(EncodeParams p) {
  const int row = blockIdx.x;  // b * Q + t
  const int h = blockIdx.y;
  const int b = row / p.Q, t = row % p.Q;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int K = 1 << p.bits;
  extern __shared__ uint16_t codes_s[];  // [G]

  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh + t * p.x_sq;
  const T* cent = reinterpret_cast<const T*>(p.centroids) + static_cast<int64_t>(h) * p.G * K * C;
  constexpr int V = C < 8 ? C : 8;
  for (int g = warp; g < p.G; g += nwarps) {
    float xv[C];
#pragma unroll
    for (int j = 0; j < C; j += V) load_vec_g<T, V>(x + g * C + j, xv + j);
    float best = __int_as_float(0x7f800000);
    int best_k = 0;
    const T* cg = cent + static_cast<int64_t>(g) * K * C;
#pragma unroll 4
    for (int k = lane; k < K; k += 32) {
      float cv[C];
#pragma unroll
      for (int j = 0; j < C; j += V) load_vec_g<T, V>(cg + k * C + j, cv + j);
      float c2 = 0.f, dot = 0.f;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        c2 = fmaf(cv[j], cv[j], c2);
        dot = fmaf(xv[j], cv[j], dot);
      }
      float d = c2 - 2.f * dot;
      if (d < best) { best = d; best_k = k; }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      float od = __shfl_xor_sync(0xffffffffu, best, off);
      int ok = __shfl_xor_sync(0xffffffffu, best_k, off);
      if (od < best || (od == best && ok < best_k)) { best = od; best_k = ok; }
    }
    if (lane == 0) codes_s[g] = static_cast<uint16_t>(best_k);
  }
  __syncthreads();
  const int64_t r = p.rows ? p.rows[t] : p.start + t;
  if (r < 0 || r >= p.cap) return;  // a device-side row outside the buffer: nothing written
  uint8_t* out = p.codes + ((static_cast<int64_t>(b) * p.H + h) * p.cap + r) * p.R;
  for (int i = threadIdx.x; i < p.R; i += blockDim.x) {
    const int lo = 8 * i, hi = 8 * i + 7;
    uint32_t v = 0;
    for (int g = lo / p.bits; g <= hi / p.bits && g < p.G; ++g) {
      const int shift = g * p.bits - lo;
      const uint32_t code = codes_s[g];
      v |= shift >= 0 ? (code << shift) : (code >> -shift);
    }
    out[i] = static_cast<uint8_t>(v & 0xffu);
  }
}

template <typename T>
cudaError_t launch_encode_t(const EncodeParams& p, cudaStream_t stream) {
  dim3 grid(p.B * p.Q, p.H);
  const int threads = 32 * (p.G < kEncMaxWarps ? p.G : kEncMaxWarps);
  size_t smem = static_cast<size_t>(p.G) * sizeof(uint16_t);
  switch (p.c) {
    case 1: encode_kernel<T, 1><<<grid, threads, smem, stream>>>(p); break;
    case 2: encode_kernel<T, 2><<<grid, threads, smem, stream>>>(p); break;
    case 4: encode_kernel<T, 4><<<grid, threads, smem, stream>>>(p); break;
    case 8: encode_kernel<T, 8><<<grid, threads, smem, stream>>>(p); break;
    case 16: encode_kernel<T, 16><<<grid, threads, smem, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_encode(const EncodeParams& p, cudaStream_t stream) {
  if (p.B * p.Q == 0) return cudaSuccess;
  return p.dtype == kBF16 ? launch_encode_t<__nv_bfloat16>(p, stream) : launch_encode_t<__half>(p, stream);
}

}  // namespace cq
