// Encode: nearest centroid (squared L2, fp32, first index on ties, as quant.encode) for new K/V tokens, packed
// into the preallocated code buffer in place: codes[b, h, start + t, :] for t < Q (or at rows[t], a device array, when
// given: static decoding, whose rows the host does not know when a CUDA graph replays). Old tokens are untouched.
//
//   x:         [B, H, Q, D] fp16/bf16, any strides with a contiguous last dim
//   centroids: [H, G, K, c] same dtype, contiguous (K = 2**bits)
//   codes:     [B, H, cap, R] uint8, contiguous, R = ceil(G * bits / 8)
//
// One launch can encode the keys and the values of a layer (launch_encode_kv: same c and dtype, bits may differ).
// Two kernels compute the same codes (the same fp32 arithmetic, the same tie rule): encode_kernel, a block per token
// row whose lanes split the centroids (few rows: a decode step), and encode_tiled_kernel, a block per 512 rows whose
// threads each take two rows against one group's centroids held in shared memory (many rows: prefill, or a decode step
// at a large batch, where encode_kernel re-read every group's centroids from L1/L2 for every row; launch_pair picks it
// from p.tiled_min rows per launch).
#include "common.cuh"
#include "kernels.h"

namespace cq {
namespace {

// Groups per block. A chunk of 8 groups holds exactly `bits` whole code bytes (group 8 k starts at bit 8 k bits), so
// blocks of one row write disjoint bytes. At one token per sequence only B x H rows run: chunks of 8 groups (c = 8,
// head_dim 128: two blocks per row, and the keys' and values' blocks in the same launch) spread a decode step's
// centroid loads over more SMs.
constexpr int kChunk = 8;

struct EncodePair {
  EncodeParams p[2];  // keys, values (p[1] unused when nz[1] == 0)
  int nz[2];          // group chunks of each (blockIdx.z: 0 .. nz[0] - 1 keys, then values)
  int gpc[2];         // groups per chunk of each (kChunk for encode_kernel, tiled_chunk for encode_tiled_kernel)
};

constexpr int kTileThreads = 256;
constexpr int kTPT = 2;                             // rows per thread
constexpr int kTileRows = kTileThreads * kTPT;      // rows per block
constexpr int kTiledMaxFloats = 12288;              // K (c + 1) fp32 in shared memory: 48 KB at most

// Groups per block of the tiled kernel: the fewest whose codes fill whole bytes (8-bit codes: one group per block, so
// that a decode step at a large batch still spreads over many blocks).
__host__ __device__ constexpr int tiled_chunk(int bits) {
  return bits % 8 == 0 ? 1 : bits % 4 == 0 ? 2 : bits % 2 == 0 ? 4 : 8;
}

// The codes of one row's chunk (ng <= kChunk groups of `bits` bits at bit gi * bits, little-endian, as quant.pack)
// written as its bytes [i0, i1).
__device__ __forceinline__ void write_chunk(uint8_t* out, int i0, int i1, int bits, int ng, const uint32_t* code) {
  uint64_t lo = 0, hi = 0;
#pragma unroll
  for (int gi = 0; gi < kChunk; ++gi) {
    if (gi < ng) {
      const uint64_t cde = code[gi];
      const int pos = gi * bits;
      if (pos < 64) {
        lo |= cde << pos;
        if (pos + bits > 64) hi |= cde >> (64 - pos);
      } else {
        hi |= cde << (pos - 64);
      }
    }
  }
  for (int j = 0; j < i1 - i0; ++j) out[i0 + j] = static_cast<uint8_t>((j < 8 ? lo >> (8 * j) : hi >> (8 * (j - 8))) & 0xffu);
}

// Block (row = b * Q + t, h, z): one warp per group of the chunk, lanes take centroids (8 loads in flight per lane
// for c <= 8), then the chunk's code bytes are assembled.
template <typename T, int C>
__global__ void __launch_bounds__(kChunk * 32) encode_kernel(const EncodePair pp) {
  const int zk = blockIdx.z;
  const bool val = zk >= pp.nz[0];
  const EncodeParams p = val ? pp.p[1] : pp.p[0];  // a copy: no dynamic index into the parameter space
  const int chunk = val ? zk - pp.nz[0] : zk;
  const int row = blockIdx.x;  // b * Q + t
  const int h = blockIdx.y;
  const int b = row / p.Q, t = row % p.Q;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = 1 << p.bits;
  const int g0 = chunk * kChunk;
  const int ng = p.G - g0 < kChunk ? p.G - g0 : kChunk;
  __shared__ uint16_t codes_s[kChunk];

  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh + t * p.x_sq;
  const T* cent = reinterpret_cast<const T*>(p.centroids) + static_cast<int64_t>(h) * p.G * K * C;
  constexpr int V = C < 8 ? C : 8;
  constexpr int kUnroll = C <= 8 ? 8 : 4;
  if (warp < ng) {
    const int g = g0 + warp;
    float xv[C];
#pragma unroll
    for (int j = 0; j < C; j += V) load_vec_g<T, V>(x + g * C + j, xv + j);
    float best = __int_as_float(0x7f800000);
    int best_k = 0;
    const T* cg = cent + static_cast<int64_t>(g) * K * C;
#pragma unroll kUnroll
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
      const float d = fmaf(-2.f, dot, c2);  // as encode_tiled_kernel
      if (d < best) { best = d; best_k = k; }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      float od = __shfl_xor_sync(0xffffffffu, best, off);
      int ok = __shfl_xor_sync(0xffffffffu, best_k, off);
      if (od < best || (od == best && ok < best_k)) { best = od; best_k = ok; }
    }
    if (lane == 0) codes_s[warp] = static_cast<uint16_t>(best_k);
  }
  __syncthreads();
  const int64_t r = p.rows ? p.rows[t] : p.start + t;
  if (r < 0 || r >= p.cap) return;  // a device-side row outside the buffer: nothing written
  uint8_t* out = p.codes + ((static_cast<int64_t>(b) * p.H + h) * p.cap + r) * p.R;
  const int i0 = chunk * p.bits;  // this chunk's first byte (kChunk groups = bits bytes)
  const int i1 = i0 + p.bits < p.R ? i0 + p.bits : p.R;
  for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const int lo = 8 * i, hi = 8 * i + 7;
    uint32_t v = 0;
    for (int g = lo / p.bits; g <= hi / p.bits && g < p.G; ++g) {
      const int shift = g * p.bits - lo;
      const uint32_t code = codes_s[g - g0];
      v |= shift >= 0 ? (code << shift) : (code >> -shift);
    }
    out[i] = static_cast<uint8_t>(v & 0xffu);
  }
}

// Block (tile of kTileRows rows, h, z): for each group of the chunk, its centroids (fp32) and their squared norms go
// to shared memory, then each thread scans them for its two rows (k ascending, strict <: the lowest index of the
// nearest, as encode_kernel's lane-then-warp reduction); then each row's chunk bytes are written.
template <typename T, int C>
__global__ void __launch_bounds__(kTileThreads) encode_tiled_kernel(const EncodePair pp) {
  const int zk = blockIdx.z;
  const bool val = zk >= pp.nz[0];
  const EncodeParams p = val ? pp.p[1] : pp.p[0];
  const int chunk = val ? zk - pp.nz[0] : zk;
  const int gpc = pp.gpc[val ? 1 : 0];
  const int h = blockIdx.y;
  const int K = 1 << p.bits;
  const int g0 = chunk * gpc;
  const int ng = p.G - g0 < gpc ? p.G - g0 : gpc;
  const int nrows = p.B * p.Q;
  extern __shared__ float cs[];  // [K][C] centroids of one group, then [K] squared norms
  float* norm = cs + K * C;

  int row[kTPT];
  bool has[kTPT];
  const T* xr[kTPT];
#pragma unroll
  for (int i = 0; i < kTPT; ++i) {
    row[i] = blockIdx.x * kTileRows + i * kTileThreads + threadIdx.x;
    has[i] = row[i] < nrows;
    const int b = has[i] ? row[i] / p.Q : 0, t = has[i] ? row[i] % p.Q : 0;
    xr[i] = reinterpret_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh + t * p.x_sq;
  }
  const T* cent = reinterpret_cast<const T*>(p.centroids) + static_cast<int64_t>(h) * p.G * K * C;
  constexpr int V = C < 8 ? C : 8;
  uint32_t code[kTPT][kChunk];
#pragma unroll
  for (int gi = 0; gi < kChunk; ++gi) {
#pragma unroll
    for (int i = 0; i < kTPT; ++i) code[i][gi] = 0;
    if (gi >= ng) continue;  // block-uniform
    const int g = g0 + gi;
    __syncthreads();  // the previous group's table is no longer read
    const T* cg = cent + static_cast<int64_t>(g) * K * C;
    for (int e = threadIdx.x; e < K * C; e += kTileThreads) cs[e] = to_f<T>(cg[e]);
    __syncthreads();
    for (int k = threadIdx.x; k < K; k += kTileThreads) {
      float c2 = 0.f;
#pragma unroll
      for (int j = 0; j < C; ++j) c2 = fmaf(cs[k * C + j], cs[k * C + j], c2);
      norm[k] = c2;
    }
    __syncthreads();
    if (!has[0]) continue;  // has[1] implies has[0]
    float xv[kTPT][C];
#pragma unroll
    for (int i = 0; i < kTPT; ++i) {
      if (has[i]) {
#pragma unroll
        for (int j = 0; j < C; j += V) load_vec_g<T, V>(xr[i] + g * C + j, xv[i] + j);
      } else {
#pragma unroll
        for (int j = 0; j < C; ++j) xv[i][j] = 0.f;
      }
    }
    float best[kTPT];
    int bk[kTPT];
#pragma unroll
    for (int i = 0; i < kTPT; ++i) { best[i] = __int_as_float(0x7f800000); bk[i] = 0; }
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      float cv[C];
#pragma unroll
      for (int j = 0; j < C; ++j) cv[j] = cs[k * C + j];
      const float c2 = norm[k];
#pragma unroll
      for (int i = 0; i < kTPT; ++i) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < C; ++j) dot = fmaf(xv[i][j], cv[j], dot);
        const float d = fmaf(-2.f, dot, c2);
        if (d < best[i]) { best[i] = d; bk[i] = k; }
      }
    }
#pragma unroll
    for (int i = 0; i < kTPT; ++i) code[i][gi] = static_cast<uint32_t>(bk[i]);
  }
  const int i0 = chunk * gpc * p.bits / 8;  // gpc groups fill whole bytes
  const int i1 = i0 + gpc * p.bits / 8 < p.R ? i0 + gpc * p.bits / 8 : p.R;
#pragma unroll
  for (int i = 0; i < kTPT; ++i) {
    if (!has[i]) continue;
    const int b = row[i] / p.Q, t = row[i] % p.Q;
    const int64_t r = p.rows ? p.rows[t] : p.start + t;
    if (r < 0 || r >= p.cap) continue;
    write_chunk(p.codes + ((static_cast<int64_t>(b) * p.H + h) * p.cap + r) * p.R, i0, i1, p.bits, ng, code[i]);
  }
}

int chunks(const EncodeParams& p) { return (p.G + kChunk - 1) / kChunk; }

int tiled_floats(const EncodeParams& p) { return (1 << p.bits) * (p.c + 1); }

template <typename T>
cudaError_t launch_t(const EncodePair& pp, cudaStream_t stream) {
  const EncodeParams& p = pp.p[0];
  const int nrows = p.B * p.Q;
  int floats = tiled_floats(p);
  if (pp.nz[1] && tiled_floats(pp.p[1]) > floats) floats = tiled_floats(pp.p[1]);
  if (p.tiled_min > 0 && nrows >= p.tiled_min && floats <= kTiledMaxFloats) {
    EncodePair tp = pp;
    for (int j = 0; j < 2; ++j) {
      tp.gpc[j] = tiled_chunk(tp.p[j].bits);
      tp.nz[j] = pp.nz[j] ? (tp.p[j].G + tp.gpc[j] - 1) / tp.gpc[j] : 0;
    }
    dim3 grid((nrows + kTileRows - 1) / kTileRows, p.H, tp.nz[0] + tp.nz[1]);
    const size_t smem = static_cast<size_t>(floats) * sizeof(float);
    switch (p.c) {
      case 1: encode_tiled_kernel<T, 1><<<grid, kTileThreads, smem, stream>>>(tp); break;
      case 2: encode_tiled_kernel<T, 2><<<grid, kTileThreads, smem, stream>>>(tp); break;
      case 4: encode_tiled_kernel<T, 4><<<grid, kTileThreads, smem, stream>>>(tp); break;
      case 8: encode_tiled_kernel<T, 8><<<grid, kTileThreads, smem, stream>>>(tp); break;
      case 16: encode_tiled_kernel<T, 16><<<grid, kTileThreads, smem, stream>>>(tp); break;
      default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
  }
  dim3 grid(nrows, p.H, pp.nz[0] + pp.nz[1]);
  const int threads = 32 * (p.G < kChunk ? p.G : kChunk);
  switch (p.c) {
    case 1: encode_kernel<T, 1><<<grid, threads, 0, stream>>>(pp); break;
    case 2: encode_kernel<T, 2><<<grid, threads, 0, stream>>>(pp); break;
    case 4: encode_kernel<T, 4><<<grid, threads, 0, stream>>>(pp); break;
    case 8: encode_kernel<T, 8><<<grid, threads, 0, stream>>>(pp); break;
    case 16: encode_kernel<T, 16><<<grid, threads, 0, stream>>>(pp); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_pair(const EncodePair& pp, cudaStream_t stream) {
  if (pp.p[0].B * pp.p[0].Q == 0) return cudaSuccess;
  return pp.p[0].dtype == kBF16 ? launch_t<__nv_bfloat16>(pp, stream) : launch_t<__half>(pp, stream);
}

}  // namespace

cudaError_t launch_encode(const EncodeParams& p, cudaStream_t stream) {
  EncodePair pp{};
  pp.p[0] = p;
  pp.nz[0] = chunks(p);
  pp.gpc[0] = pp.gpc[1] = kChunk;
  return launch_pair(pp, stream);
}

cudaError_t launch_encode_kv(const EncodeParams& k, const EncodeParams& v, cudaStream_t stream) {
  // one grid for both: the same rows (B, Q, H), channels per group and dtype; the values' G (threads per block) may
  // not exceed the keys' (G = D / c, the same D)
  if (k.B != v.B || k.Q != v.Q || k.H != v.H || k.c != v.c || k.G != v.G || k.dtype != v.dtype)
    return cudaErrorInvalidValue;
  EncodePair pp{};
  pp.p[0] = k;
  pp.p[1] = v;
  pp.nz[0] = chunks(k);
  pp.nz[1] = chunks(v);
  pp.gpc[0] = pp.gpc[1] = kChunk;
  return launch_pair(pp, stream);
}

}  // namespace cq
