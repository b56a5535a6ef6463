// Dense keys (RoPE applied) and values from CQ codes, for the prefill path that hands the attention itself to
// torch SDPA (FlashAttention / memory-efficient attention). Prefill is bound by matrix math, not by the cache's bytes:
// one pass that writes the dequantized layer once and the best attention kernel available beat dequantizing every
// key tile again for every block of 64 queries (kernels/prefill.cu). The decode kernels never do this.
//
// One block per (64 tokens, kv head, batch row): the tokens' code words are staged in shared memory, each key is
// looked up, rotated in fp32 with the cache's cos/sin table (as the reference path does) and rounded once to the
// compute dtype; values are looked up and copied. Output [B, H_kv, S, D], contiguous.
#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"

namespace cq {
namespace {

constexpr int kDqTok = 64;
constexpr int kDqThreads = 256;

__host__ __device__ inline int dq_words(int row_bytes) { return (kDqTok * row_bytes + 6) / 4 + 2; }

template <typename T, int D>
__global__ void __launch_bounds__(kDqThreads) dequant_kernel(const AttnParams p, T* kout, T* vout) {
  constexpr int HALF = D / 2;
  extern __shared__ __align__(16) uint32_t words[];
  uint32_t* kw = words;
  uint32_t* vw = words + dq_words(p.k_rb);
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kDqTok;
  const int n = min(kDqTok, p.S - j0);

  const HeadCodes<T> hc(p, b, h);
  const uint32_t kbit0 = stage_code_words(kw, p.k_codes, hc.kbase, j0, n, p.k_rb);
  const uint32_t vbit0 = stage_code_words(vw, p.v_codes, hc.vbase, j0, n, p.v_rb);
  __syncthreads();

  const float* cos_b = p.cos_t + b * p.cs_sb;
  const float* sin_b = p.sin_t + b * p.cs_sb;
  const int64_t orow = ((static_cast<int64_t>(b) * p.Hkv + h) * p.S + j0) * D;

  // keys: item = (token, chunk of 8 channel pairs (i, i + D/2))
  for (int it = threadIdx.x; it < n * (D / 16); it += blockDim.x) {
    const int kn = it / (D / 16), ca = 8 * (it % (D / 16));
    const int64_t row = static_cast<int64_t>(j0 + kn) * D;
    uint4 ua, ub;
    rope_key_chunk<T>(ua, ub, hc.kcent, D, hc.lck, hc.Kk, p.k_bits, kw, kbit0 + static_cast<uint32_t>(kn * p.k_rb * 8),
                      ca, cos_b + row, sin_b + row);
    T* kp = kout + orow + static_cast<int64_t>(kn) * D;
    *reinterpret_cast<uint4*>(kp + ca) = ua;
    *reinterpret_cast<uint4*>(kp + HALF + ca) = ub;
  }
  // values: item = (token, chunk of 8 channels)
  for (int it = threadIdx.x; it < n * (D / 8); it += blockDim.x) {
    const int kn = it / (D / 8), cb = it % (D / 8);
    const uint32_t bit = vbit0 + static_cast<uint32_t>(kn * p.v_rb * 8);
    float v8[8];
    gather8<T, false, 0>(v8, hc.vcent, D, hc.lcv, hc.Kv, p.v_bits, vw, bit, 8 * cb);
    *reinterpret_cast<uint4*>(vout + orow + static_cast<int64_t>(kn) * D + 8 * cb) =
        make_uint4(pack2<T>(v8[0], v8[1]), pack2<T>(v8[2], v8[3]), pack2<T>(v8[4], v8[5]), pack2<T>(v8[6], v8[7]));
  }
}

template <typename T, int D>
cudaError_t launch_dq(const AttnParams& p, void* kout, void* vout, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(dq_words(p.k_rb) + dq_words(p.v_rb)) * 4;
  dim3 grid((p.S + kDqTok - 1) / kDqTok, p.Hkv, p.B);
  dequant_kernel<T, D><<<grid, kDqThreads, smem, stream>>>(p, static_cast<T*>(kout), static_cast<T*>(vout));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dequant(const AttnParams& p, void* kout, void* vout, cudaStream_t stream) {
  if (p.B == 0 || p.S == 0) return cudaSuccess;
  if (p.D == 128) {
    return p.dtype == kBF16 ? launch_dq<__nv_bfloat16, 128>(p, kout, vout, stream)
                            : launch_dq<__half, 128>(p, kout, vout, stream);
  }
  if (p.D == 64) {
    return p.dtype == kBF16 ? launch_dq<__nv_bfloat16, 64>(p, kout, vout, stream)
                            : launch_dq<__half, 64>(p, kout, vout, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cq
