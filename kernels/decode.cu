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
  p.has_fp = (p.window > 0 || p.n_sink > 0) ? 1 : 0;
  p.tab_smem = 0;
  p.tile = 0;
  if (mma_decode_applies(p, max_smem)) {
    // one block (~216 KB of shared memory) per SM: split the sequence only when the rows do not fill the SMs
    p.mma = 1;
    p.mma_nhb = mma_head_blocks(p);
    const int base = p.B * p.Hkv * p.mma_nhb;  // items per code split: (batch row, head block)
    // splits of at least 1024 tokens; c = 8 GQA blocks with the direct P.V (items of one tile of at most
    // min(direct_max, 512) tokens, see decode_mma.cu) split down to that
    const int min_split = mma_direct_split(p) ? std::min(p.direct_max, 512) : 1024;
    const int ncode =
        base < num_sms ? std::max(1, std::min(num_sms / base, (p.S + min_split - 1) / min_split)) : 1;
    p.nsplit = ncode + p.has_fp;
    p.div_ncode = fast_div(ncode);
    p.div_b = fast_div(std::max(1, p.B));  // an empty batch launches nothing, but fast_div needs d >= 1
    p.div_nhb = fast_div(p.mma_nhb);
    const int per_item = (p.S + ncode - 1) / ncode;  // tokens per item, at most (sinks and window included)
    p.mma_long = p.k_c == 8 && p.variant != 2 && mma_group(p) == 1 && per_item >= p.long_min ? 1 : 0;
    // at most one resident block per SM, each looping over its items: a block's key tables stay loaded while its
    // items share the kv head, and the next item's loads overlap the current one's epilogue
    const int64_t items = static_cast<int64_t>(base) * ncode;
    p.mma_blocks = static_cast<int>(std::min<int64_t>(items, p.max_blocks > 0 ? p.max_blocks : num_sms));
    return cudaSuccess;
  }
  const int rep = p.Hq / p.Hkv;
  p.nq = rep * p.Q == 1 ? 1 : 4;
  p.nchunk = (rep * p.Q + p.nq - 1) / p.nq;
  const int step = (p.nq == 1 ? 16 : 8) * (32 / (p.D / 16));
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

namespace {

// The full-precision split of a tensor-core decode (one query per query head): attention over the sinks and the
// recent window, as decode.cuh's full-precision block computes it, written as split nsplit - 1's partial (m, l, o)
// for the combine. A block of kFpThreads per (batch row, query head), a chunk of kFpThreads keys at a time: a thread
// per key for the scores (its whole key row in flight), then each warp takes 32 of the keys for P.V, a lane holding
// D / 32 channels (coalesced value rows), the warps' sums added through shared memory. Few registers and few
// dependent memory round trips: the window is a few hundred tokens, so this kernel is latency-bound.
constexpr int kFpThreads = 128;

template <typename T, int D>
__global__ void __launch_bounds__(kFpThreads) fp_split_kernel(const AttnParams p) {
  constexpr int kW = kFpThreads / 32, kCL = D / 32;  // warps; channels per lane in P.V
  __shared__ __align__(16) float qs[D];
  __shared__ __align__(16) float osum[kW][D];
  __shared__ float ps[kFpThreads], red[kW];
  __shared__ const T* vrow[kFpThreads];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.x / p.Hq, hq = blockIdx.x % p.Hq, h = hq / (p.Hq / p.Hkv);
  const int mlo = p.range[b * 2], mhi = p.range[b * 2 + 1];
  const int start = query_start(p);
  const int code_hi = p.window > 0 ? max(0, start - p.window + 1) : p.S;
  const int fp_lo = max(min(p.S, code_hi), p.n_sink);
  const int nf = p.n_sink + max(0, min(p.S, mhi) - fp_lo);
  const float qscale = p.scaling * kLog2e;  // keys already rotated
  if (tid < D) qs[tid] = to_f<T>(reinterpret_cast<const T*>(p.q)[b * p.q_sb + hq * p.q_sh + tid]) * qscale;
  auto block_reduce = [&](float v, bool is_max) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = is_max ? fmaxf(v, o) : v + o;
    }
    __syncthreads();  // red is free (its last readers are done)
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[0];
#pragma unroll
    for (int w = 1; w < kW; ++w) v = is_max ? fmaxf(v, red[w]) : v + red[w];
    return v;
  };
  __syncthreads();
  float m = kNegInf, l = 0.f, o = 0.f;  // o: channel tid (tid < D)
  for (int base = 0; base < nf; base += kFpThreads) {
    // ---- scores: a thread per key j (sinks, then the window; the new tokens come from new_k / new_v)
    const int u = base + tid;
    const int j = u < p.n_sink ? u : fp_lo + (u - p.n_sink);
    float s = kNegInf;
    const T* vp = nullptr;
    if (u < nf && j >= mlo && j < mhi && (j < p.n_sink || j >= code_hi)) {
      const FpRow f = fp_row(p, j, start);
      const T* kp = reinterpret_cast<const T*>(f.k.data) + b * f.k.sb + h * f.k.sh + f.row * f.k.st;
      vp = reinterpret_cast<const T*>(f.v.data) + b * f.v.sb + h * f.v.sh + f.row * f.v.st;
      uint4 kr[D / 8];
#pragma unroll
      for (int c = 0; c < D / 8; ++c) kr[c] = __ldg(reinterpret_cast<const uint4*>(kp) + c);
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        const float4 q0 = *reinterpret_cast<const float4*>(qs + 8 * c);
        const float4 q1 = *reinterpret_cast<const float4*>(qs + 8 * c + 4);
        const float2 a = unpack2<T>(kr[c].x), bb = unpack2<T>(kr[c].y);
        const float2 cc = unpack2<T>(kr[c].z), d = unpack2<T>(kr[c].w);
        acc = fmaf(q0.x, a.x, fmaf(q0.y, a.y, fmaf(q0.z, bb.x, fmaf(q0.w, bb.y, acc))));
        acc = fmaf(q1.x, cc.x, fmaf(q1.y, cc.y, fmaf(q1.z, d.x, fmaf(q1.w, d.y, acc))));
      }
      s = acc;
    }
    const float mn = fmaxf(m, block_reduce(s, true));
    if (mn == kNegInf) continue;  // no key yet (block-uniform)
    const float a = m == kNegInf ? 0.f : exp2f(m - mn);
    const float pv = s == kNegInf ? 0.f : exp2f(s - mn);
    ps[tid] = pv;
    vrow[tid] = vp;
    l = l * a + block_reduce(pv, false);  // its barriers also publish ps and vrow
    m = mn;
    // ---- P.V: warp w takes keys 32 w .. 32 w + 31 of the chunk, lane channels kCL lane ..
    float ov[kCL];
#pragma unroll
    for (int e = 0; e < kCL; ++e) ov[e] = 0.f;
#pragma unroll 8
    for (int t = 32 * warp; t < 32 * warp + 32; ++t) {
      const T* row = vrow[t];
      if (row == nullptr) continue;  // masked or past the chunk (warp-uniform)
      float v[kCL];
      load_vec_g<T, kCL>(row + kCL * lane, v);
      const float w = ps[t];
#pragma unroll
      for (int e = 0; e < kCL; ++e) ov[e] = fmaf(w, v[e], ov[e]);
    }
#pragma unroll
    for (int e = 0; e < kCL; ++e) osum[warp][kCL * lane + e] = ov[e];
    __syncthreads();
    if (tid < D) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kW; ++w) sum += osum[w][tid];
      o = o * a + sum;
    }
    __syncthreads();  // ps, vrow and osum are read before the next chunk writes them
  }
  const int64_t row = (static_cast<int64_t>(b) * p.Hq + hq) * p.nsplit + p.nsplit - 1;
  if (tid < D) p.ws_o[row * D + tid] = o;
  if (tid == 0) { p.ws_ml[row * 2] = m; p.ws_ml[row * 2 + 1] = l; }
}

}  // namespace

cudaError_t launch_fp_split(const AttnParams& p, cudaStream_t stream) {
  if (p.Q != 1 || (p.D != 64 && p.D != 128) || p.nsplit < 2) return cudaErrorInvalidValue;
  const int n = p.B * p.Hq;
  if (p.dtype == kBF16 && p.D == 128) fp_split_kernel<__nv_bfloat16, 128><<<n, kFpThreads, 0, stream>>>(p);
  else if (p.dtype == kBF16) fp_split_kernel<__nv_bfloat16, 64><<<n, kFpThreads, 0, stream>>>(p);
  else if (p.D == 128) fp_split_kernel<__half, 128><<<n, kFpThreads, 0, stream>>>(p);
  else fp_split_kernel<__half, 64><<<n, kFpThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_combine(const AttnParams& p, cudaStream_t stream) {
  if (p.dtype == kBF16) combine_kernel<__nv_bfloat16><<<p.B * p.Hq * p.Q, p.D, 0, stream>>>(p);
  else combine_kernel<__half><<<p.B * p.Hq * p.Q, p.D, 0, stream>>>(p);
  return cudaGetLastError();
}

namespace {
// Two events per device, made once: the fork to and the join from the full-precision split's stream (an event
// recorded again replaces its previous state, also inside a CUDA graph capture).
cudaError_t fork_join_events(cudaEvent_t& fork, cudaEvent_t& join) {
  static cudaEvent_t ev[64][2] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  for (int i = 0; i < 2 && e == cudaSuccess; ++i)
    if (!ev[dev][i]) e = cudaEventCreateWithFlags(&ev[dev][i], cudaEventDisableTiming);
  fork = ev[dev][0];
  join = ev[dev][1];
  return e;
}
}  // namespace

cudaError_t launch_decode(const AttnParams& p, cudaStream_t stream, cudaStream_t fp_stream) {
  if (p.B * p.Q == 0) return cudaSuccess;
  if (!p.mma) return p.dtype == kBF16 ? launch_dt<__nv_bfloat16>(p, stream) : launch_dt<__half>(p, stream);
  // tensor cores over the codes (splits 0 .. nsplit - 1 - has_fp); the window and sinks as the last split
  // (fp_split_kernel); then the split-K combine. With fp_stream the full-precision split runs there, beside the code
  // splits (it reads no codes and writes only its own partial), so that where they leave SMs free (small batches) it
  // does not wait for them; the combine waits for both.
  cudaError_t e = cudaSuccess;
  if (p.has_fp && fp_stream) {
    cudaEvent_t fork, join;
    e = fork_join_events(fork, join);
    if (e == cudaSuccess) e = cudaEventRecord(fork, stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(fp_stream, fork, 0);
    if (e == cudaSuccess) e = launch_fp_split(p, fp_stream);
    if (e == cudaSuccess) e = cudaEventRecord(join, fp_stream);
    if (e == cudaSuccess) e = launch_mma_decode(p, stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent(stream, join, 0);
  } else {
    e = launch_mma_decode(p, stream);
    if (e == cudaSuccess && p.has_fp) e = launch_fp_split(p, stream);
  }
  if (e != cudaSuccess || p.nsplit == 1) return e;
  return launch_combine(p, stream);
}

}  // namespace cq
