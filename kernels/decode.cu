// Host side of the decode attention kernel (decode.cuh) and the split-K combine.
#include <algorithm>

#include "decode.cuh"

namespace cq {

// instantiated in decode_<dtype>_d<D>.cu so that the build compiles them in parallel
extern template cudaError_t launch_d<__half, 64>(const AttnParams&, cudaStream_t);
extern template cudaError_t launch_d<__half, 128>(const AttnParams&, cudaStream_t);
extern template cudaError_t launch_d<__nv_bfloat16, 64>(const AttnParams&, cudaStream_t);
extern template cudaError_t launch_d<__nv_bfloat16, 128>(const AttnParams&, cudaStream_t);

namespace {

template <typename T>
cudaError_t launch_dt(const AttnParams& p, cudaStream_t stream) {
  if (p.D == 128) return launch_d<T, 128>(p, stream);
  if (p.D == 64) return launch_d<T, 64>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

size_t decode_smem_bytes(const AttnParams& p) { return dec_layout(p, p.nq).total; }

cudaError_t plan_decode(AttnParams& p, int num_sms, size_t max_smem) {
  if (p.D != 64 && p.D != 128) return cudaErrorInvalidValue;
  p.mma = 0;
  const int rep = p.Hq / p.Hkv;
  p.nq = rep * p.Q == 1 ? 1 : 4;
  p.nchunk = (rep * p.Q + p.nq - 1) / p.nq;
  p.has_fp = (p.window > 0 || p.n_sink > 0) ? 1 : 0;
  const int step = (p.nq == 1 ? 16 : 8) * (32 / (p.D / 16));
  if (mma_decode_applies(p, max_smem)) {
    // one block (~216 KB of shared memory) per SM: split the sequence only when the rows do not fill the SMs
    p.mma = 1;
    // window / sinks: the CUDA-core kernel's full-precision split (nq, nchunk above; no tables, the smallest tile)
    p.tab_smem = 0;
    p.tile = step;
    const int base = p.B * (p.Hq / mma_group(p));  // items per code split: (batch row, R query heads)
    const int ncode = base < num_sms ? std::max(1, std::min(num_sms / base, (p.S + 1023) / 1024)) : 1;
    p.nsplit = ncode + p.has_fp;
    // at most one resident block per SM, each looping over its items: a block's key tables stay loaded while its
    // items share the kv head, and the next item's loads overlap the current one's epilogue
    const int64_t items = static_cast<int64_t>(base) * ncode;
    p.mma_blocks = static_cast<int>(std::min<int64_t>(items, p.max_blocks > 0 ? p.max_blocks : num_sms));
    return cudaSuccess;
  }
  p.tab_smem = 0;
  p.tile = 0;
  for (int tab = 1; tab >= 0 && !p.tile; --tab) {
    for (int tile = 8 * step; tile >= step; tile /= 2) {
      AttnParams t = p;
      t.tab_smem = tab;
      t.tile = tile;
      if (dec_layout(t, t.nq).total <= max_smem) { p.tab_smem = tab; p.tile = tile; break; }
    }
  }
  if (!p.tile) return cudaErrorInvalidValue;
  const int base = p.B * p.Hkv * p.nchunk;
  int ncode = 1;
  if (base < num_sms) ncode = std::max(1, std::min(num_sms / base, (p.S + 255) / 256));
  p.nsplit = ncode + p.has_fp;
  return cudaSuccess;
}

cudaError_t launch_combine(const AttnParams& p, cudaStream_t stream) {
  if (p.dtype == kBF16) combine_kernel<__nv_bfloat16><<<p.B * p.Hq * p.Q, p.D, 0, stream>>>(p);
  else combine_kernel<__half><<<p.B * p.Hq * p.Q, p.D, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_decode(const AttnParams& p, cudaStream_t stream) {
  if (p.B * p.Q == 0) return cudaSuccess;
  if (!p.mma) return p.dtype == kBF16 ? launch_dt<__nv_bfloat16>(p, stream) : launch_dt<__half>(p, stream);
  // tensor cores over the codes (splits 0 .. nsplit - 1 - has_fp); the window and sinks as the CUDA-core kernel's
  // full-precision split; then the split-K combine
  cudaError_t e = launch_mma_decode(p, stream);
  if (e != cudaSuccess || !p.has_fp) return e;
  AttnParams f = p;
  f.fp_only = 1;
  e = f.dtype == kBF16 ? launch_dt<__nv_bfloat16>(f, stream) : launch_dt<__half>(f, stream);
  if (e != cudaSuccess) return e;
  return launch_combine(p, stream);
}

}  // namespace cq
