// Encode: nearest centroid (squared L2, fp32, first index on ties, as quant.encode) for new K/V tokens, packed
// into the preallocated code buffer in place: codes[b, h, start + t, :] for t < Q (or at rows[t], a device array, when
// given: static decoding, whose rows the host does not know when a CUDA graph replays). Old tokens are untouched.
//
//   x:         [B, H, Q, D] fp16/bf16, any strides with a contiguous last dim
//   centroids: [H, G, K, c] same dtype, contiguous (K = 2**bits)
//   codes:     [B, H, cap, R] uint8, contiguous, R = ceil(G * bits / 8)
//
// One launch can encode the keys and the values of a layer (launch_encode_kv: same c and dtype, bits may differ).
// Three kernels. encode_kernel: a block per token row whose lanes split the centroids (few rows: a decode step at a
// small batch). encode_tiled_kernel: a block per 512 rows whose threads each take two rows against one group's
// centroids in shared memory (encode_kernel re-read every group's centroids from L1/L2 for every row); the same fp32
// arithmetic and tie rule as encode_kernel, so the same codes. encode_mma_kernel: x . c on the tensor cores (16 rows
// x 8 centroids per mma), the nearest on CUDA cores; its sums may differ in the last bits, so a near-tie may go the
// other way. launch_t picks: below p.tiled_min rows encode_kernel; from it encode_mma_kernel where p.use_mma and it
// applies (c >= 8, 3 <= bits <= 10), else encode_tiled_kernel where its table fits, else encode_kernel.
#include <type_traits>

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
  int gpc[2];         // groups per chunk of each (kChunk for encode_kernel, tiled_chunk for the tiled and tensor-core kernels)
  int has_ring;       // 1: blockIdx.z == nz[0] + nz[1] is one more slice that copies ring's rows
  RingWrite ring;
};

// The ring slice's blocks (every (x, y) of the grid at z = nz[0] + nz[1]) share the 2 B H Q row copies: block i takes
// rows i, i + nblocks, ..., its threads the row's 16-byte (or 2-byte) pieces. Only the kernels' kRing builds have it:
// out of line (__noinline__) its call gave the encode kernels a stack and up to 60 registers where they had 32, and
// inline in every build the c = 4 tiled kernel ran 7-8% slower (H100, bench encode, 2026-11-27).
__device__ __forceinline__ void ring_copy(const RingWrite& w) {
  const int nb = gridDim.x * gridDim.y, bid = blockIdx.y * gridDim.x + blockIdx.x;
  const int per = w.B * w.H * w.Q, n = 2 * per;
  for (int i = bid; i < n; i += nb) {
    const int j = i >= per, rest = i - j * per;
    const int t = rest % w.Q, bh = rest / w.Q, h = bh % w.H, b = bh / w.H;
    const int64_t r = w.rows[t];
    if (r < 0 || r >= w.cap) continue;
    const uint16_t* src = static_cast<const uint16_t*>(w.src[j]) + b * w.s_sb[j] + h * w.s_sh[j] + t * w.s_sq[j];
    uint16_t* dst = static_cast<uint16_t*>(w.dst[j]) + b * w.d_sb[j] + h * w.d_sh[j] + r * w.d_st[j];
    if (w.vec) {
      for (int k = threadIdx.x; k < w.D / 8; k += blockDim.x)
        reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(src)[k];
    } else {
      for (int k = threadIdx.x; k < w.D; k += blockDim.x) dst[k] = src[k];
    }
  }
}

// true (after copying) for the blocks of the ring slice, which encode nothing (kRing builds: pp.has_ring is set)
__device__ __forceinline__ bool ring_block(const EncodePair& pp) {
  if (static_cast<int>(blockIdx.z) < pp.nz[0] + pp.nz[1]) return false;
  ring_copy(pp.ring);
  return true;
}

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

// What block z of a launch encodes: the keys' or the values' parameters (val: blockIdx.z >= nz[0]) and its chunk of
// groups (gpc groups from g0; ng of them exist). The row kernel's chunks are kChunk groups (row_chunks), the others'
// pp.gpc. The kernel then takes its parameters as `const EncodeParams p = sl.val ? pp.p[1] : pp.p[0]` (a copy: no
// dynamic index into the parameter space).
struct Slice {
  bool val;
  int chunk, gpc, g0, ng;
};

__device__ __forceinline__ Slice slice_of(const EncodePair& pp, bool row_chunks) {
  const int zk = blockIdx.z;
  Slice s;
  s.val = zk >= pp.nz[0];
  s.chunk = s.val ? zk - pp.nz[0] : zk;
  s.gpc = row_chunks ? kChunk : pp.gpc[s.val ? 1 : 0];
  s.g0 = s.chunk * s.gpc;
  const int G = s.val ? pp.p[1].G : pp.p[0].G;
  s.ng = G - s.g0 < s.gpc ? G - s.g0 : s.gpc;
  return s;
}

// The code row that token t of batch row b and head h goes to (start + t, or rows[t] when given), or nullptr when a
// device-side row lies outside the buffer (nothing is written then).
__device__ __forceinline__ uint8_t* code_row(const EncodeParams& p, int b, int h, int t) {
  const int64_t r = p.rows ? p.rows[t] : p.start + t;
  if (r < 0 || r >= p.cap) return nullptr;
  return p.codes + ((static_cast<int64_t>(b) * p.H + h) * p.cap + r) * p.R;
}

// The code bytes [first, end) of a chunk of gpc groups (gpc * bits is a multiple of 8: whole bytes).
__device__ __forceinline__ int2 chunk_bytes(const EncodeParams& p, int chunk, int gpc) {
  const int i0 = chunk * gpc * p.bits / 8;
  const int i1 = i0 + gpc * p.bits / 8;
  return make_int2(i0, i1 < p.R ? i1 : p.R);
}

// Block (row = b * Q + t, h, z): one warp per group of the chunk, lanes take centroids (8 loads in flight per lane
// for c <= 8), then the chunk's code bytes are assembled.
template <typename T, int C, bool kRing>
__global__ void __launch_bounds__(kChunk * 32) encode_kernel(const EncodePair pp) {
  if constexpr (kRing) {  // the ring slice's blocks copy and return; the other builds have no ring code
    if (ring_block(pp)) return;
  }
  const Slice sl = slice_of(pp, true);
  const EncodeParams p = sl.val ? pp.p[1] : pp.p[0];
  const int g0 = sl.g0, ng = sl.ng;
  const int row = blockIdx.x;  // b * Q + t
  const int h = blockIdx.y;
  const int b = row / p.Q, t = row % p.Q;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = 1 << p.bits;
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
  uint8_t* out = code_row(p, b, h, t);
  if (!out) return;
  const int2 ib = chunk_bytes(p, sl.chunk, kChunk);
  for (int i = ib.x + threadIdx.x; i < ib.y; i += blockDim.x) {
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
template <typename T, int C, bool kRing>
__global__ void __launch_bounds__(kTileThreads) encode_tiled_kernel(const EncodePair pp) {
  if constexpr (kRing) {  // the ring slice's blocks copy and return; the other builds have no ring code
    if (ring_block(pp)) return;
  }
  const Slice sl = slice_of(pp, false);
  const EncodeParams p = sl.val ? pp.p[1] : pp.p[0];
  const int g0 = sl.g0, ng = sl.ng;
  const int h = blockIdx.y;
  const int K = 1 << p.bits;
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
  const int2 ib = chunk_bytes(p, sl.chunk, sl.gpc);
#pragma unroll
  for (int i = 0; i < kTPT; ++i) {
    if (!has[i]) continue;
    uint8_t* out = code_row(p, row[i] / p.Q, h, row[i] % p.Q);
    if (out) write_chunk(out, ib.x, ib.y, p.bits, ng, code[i]);
  }
}

// ---- tensor-core kernel (many rows, c >= 8, 3 <= bits <= 10): x . c for 16 rows x 8 centroids per mma.m16n8k16 (the
// group's c channels zero-padded to 16), then d = |c|^2 - 2 x.c and the running nearest per row on CUDA cores.
// The products are exact (16-bit inputs) but the tensor cores sum them in their own order, so d may differ from the
// fmaf chain of the other two kernels in the last bits: near-ties may pick another centroid (tests/test_kernels.py
// holds it to the reference's tolerance); exact ties still give the lowest index.
constexpr int kMmaWarps = 8;
constexpr int kMmaRowTiles = 2;                          // 16-row tiles per warp, sharing each centroid fragment
constexpr int kMmaRows = kMmaWarps * kMmaRowTiles * 16;  // rows per block (256)
constexpr int kMmaMaxBytes = 48 * 1024;                  // centroids (16 channels of 16 bits) + norms (fp32)

template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Shared position of channel k (0..15) in a centroid's 16-element row: the four a lane t needs for its B fragment
// (k = 2t, 2t + 1, 2t + 8, 2t + 9) side by side, read as one 8-byte load.
__device__ __forceinline__ int mma_slot(int k) { return ((k & 7) >> 1) * 4 + (k >> 3) * 2 + (k & 1); }

// Block (tile of kMmaRows rows, h, z): per group of the chunk, its centroids (16-bit, zero-padded to 16 channels, in
// the B-fragment order) and squared norms (fp32, the fmaf chain of the other kernels) to shared memory; each warp
// scans them for two 16-row tiles; the quad of lanes holding a row's columns agrees on its nearest (lowest index on
// ties); codes gather in shared memory and each thread writes one row's chunk bytes.
template <typename T, int C, bool kRing>
__global__ void __launch_bounds__(kMmaWarps * 32) encode_mma_kernel(const EncodePair pp) {
  static_assert(C <= 16, "c <= 16");
  if constexpr (kRing) {  // the ring slice's blocks copy and return; the other builds have no ring code
    if (ring_block(pp)) return;
  }
  const Slice sl = slice_of(pp, false);
  const EncodeParams p = sl.val ? pp.p[1] : pp.p[0];
  const int g0 = sl.g0, ng = sl.ng;
  const int h = blockIdx.y;
  const int K = 1 << p.bits;
  const int nrows = p.B * p.Q;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gq = lane >> 2, tq = lane & 3;  // mma fragment row group and thread in group
  extern __shared__ __align__(16) unsigned char mma_smem[];
  T* cs = reinterpret_cast<T*>(mma_smem);                                   // [K][16]
  float* norm = reinterpret_cast<float*>(mma_smem + static_cast<size_t>(K) * 16 * sizeof(T));  // [K]
  __shared__ uint16_t codes_s[kMmaRows][kChunk];

  const int row0 = blockIdx.x * kMmaRows;
  const T* cent = reinterpret_cast<const T*>(p.centroids) + static_cast<int64_t>(h) * p.G * K * C;
  const T* xs = reinterpret_cast<const T*>(p.x);
  for (int gi = 0; gi < ng; ++gi) {
    const int g = g0 + gi;
    __syncthreads();  // the previous group's table is no longer read
    const T* cg = cent + static_cast<int64_t>(g) * K * C;
    for (int e = threadIdx.x; e < K * 16; e += blockDim.x) {
      const int k = e >> 4, j = e & 15;
      cs[k * 16 + mma_slot(j)] = j < C ? cg[k * C + j] : from_f<T>(0.f);
    }
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      float c2 = 0.f;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const float v = to_f<T>(cg[k * C + j]);
        c2 = fmaf(v, v, c2);
      }
      norm[k] = c2;
    }
    __syncthreads();
    // A fragments: rows r = tile base + gq (+ 8), channels 2 tq, 2 tq + 1 (a[0] / a[1]) and + 8 (a[2] / a[3])
    uint32_t a[kMmaRowTiles][4];
#pragma unroll
    for (int rt = 0; rt < kMmaRowTiles; ++rt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = row0 + (warp * kMmaRowTiles + rt) * 16 + gq + 8 * half;
        float v[4] = {0.f, 0.f, 0.f, 0.f};
        if (r < nrows) {
          const int b = r / p.Q, t = r % p.Q;
          const T* xr = xs + b * p.x_sb + h * p.x_sh + t * p.x_sq + g * C;
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int j = 2 * tq + (u & 1) + 8 * (u >> 1);
            if (j < C) v[u] = to_f<T>(xr[j]);
          }
        }
        a[rt][half] = pack2<T>(v[0], v[1]);      // row gq (+8 for half 1), channels 2tq, 2tq + 1
        a[rt][2 + half] = pack2<T>(v[2], v[3]);  // the same row, channels 2tq + 8, 2tq + 9
      }
    }
    float best[kMmaRowTiles * 2];
    int bk[kMmaRowTiles * 2];
#pragma unroll
    for (int i = 0; i < kMmaRowTiles * 2; ++i) { best[i] = __int_as_float(0x7f800000); bk[i] = 0; }
#pragma unroll 2
    for (int nt = 0; nt < K / 8; ++nt) {
      const uint2 bb = *reinterpret_cast<const uint2*>(cs + (nt * 8 + gq) * 16 + tq * 4);
      const float2 nr = *reinterpret_cast<const float2*>(norm + nt * 8 + 2 * tq);
#pragma unroll
      for (int rt = 0; rt < kMmaRowTiles; ++rt) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        mma_16816<T>(acc, a[rt], bb.x, bb.y);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float d = fmaf(-2.f, acc[e], (e & 1) ? nr.y : nr.x);
          const int slot = rt * 2 + (e >> 1);
          if (d < best[slot]) { best[slot] = d; bk[slot] = nt * 8 + 2 * tq + (e & 1); }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kMmaRowTiles * 2; ++i) {
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float od = __shfl_xor_sync(0xffffffffu, best[i], off);
        const int ok = __shfl_xor_sync(0xffffffffu, bk[i], off);
        if (od < best[i] || (od == best[i] && ok < bk[i])) { best[i] = od; bk[i] = ok; }
      }
      if (tq == 0) codes_s[(warp * kMmaRowTiles + (i >> 1)) * 16 + gq + 8 * (i & 1)][gi] = static_cast<uint16_t>(bk[i]);
    }
  }
  __syncthreads();
  const int r = row0 + threadIdx.x;  // kMmaRows == blockDim.x: one row per thread
  if (r >= nrows) return;
  uint8_t* out = code_row(p, r / p.Q, h, r % p.Q);
  if (!out) return;
  uint32_t code[kChunk];
#pragma unroll
  for (int gi = 0; gi < kChunk; ++gi) code[gi] = gi < ng ? codes_s[threadIdx.x][gi] : 0u;
  const int2 ib = chunk_bytes(p, sl.chunk, sl.gpc);
  write_chunk(out, ib.x, ib.y, p.bits, ng, code);
}

int chunks(const EncodeParams& p) { return (p.G + kChunk - 1) / kChunk; }

int tiled_floats(const EncodeParams& p) { return (1 << p.bits) * (p.c + 1); }
// the tensor-core kernel: full n-tiles of 8 centroids, and its shared memory (static codes 4 KB + dynamic) within 48 KB
// and c >= 8: with c <= 4 the padding to 16 channels left it no faster than encode_tiled_kernel (H100, CQ-4c8b: 0.121
// vs 0.114 ms at 512 rows, 3.53 vs 3.37 at 8 x 2048; docs/RESULTS_kernels.md)
bool mma_fits(const EncodeParams& p) {
  return p.c >= 8 && p.bits >= 3 && (static_cast<size_t>(1) << p.bits) * (16 * 2 + 4) + sizeof(uint16_t) * kMmaRows * kChunk <= kMmaMaxBytes;
}

template <typename T, bool kRing>
cudaError_t launch_t(const EncodePair& pp, cudaStream_t stream) {
  const EncodeParams& p = pp.p[0];
  const int nrows = p.B * p.Q;
  int floats = tiled_floats(p);
  if (pp.nz[1] && tiled_floats(pp.p[1]) > floats) floats = tiled_floats(pp.p[1]);
  const bool many = p.tiled_min > 0 && nrows >= p.tiled_min;
  // the tiled and tensor-core kernels' chunks: the fewest groups that fill whole code bytes
  EncodePair tp = pp;
  int bits_max = 0;
  for (int j = 0; j < 2; ++j) {
    tp.gpc[j] = tiled_chunk(tp.p[j].bits);
    tp.nz[j] = pp.nz[j] ? (tp.p[j].G + tp.gpc[j] - 1) / tp.gpc[j] : 0;
    if (pp.nz[j] && tp.p[j].bits > bits_max) bits_max = tp.p[j].bits;
  }
  if (many && p.use_mma && mma_fits(p) && (!pp.nz[1] || mma_fits(pp.p[1]))) {
    dim3 grid((nrows + kMmaRows - 1) / kMmaRows, p.H, tp.nz[0] + tp.nz[1] + (kRing ? 1 : 0));
    const size_t smem = static_cast<size_t>(1 << bits_max) * (16 * sizeof(T) + sizeof(float));
    switch (p.c) {
      case 1: encode_mma_kernel<T, 1, kRing><<<grid, kMmaWarps * 32, smem, stream>>>(tp); break;
      case 2: encode_mma_kernel<T, 2, kRing><<<grid, kMmaWarps * 32, smem, stream>>>(tp); break;
      case 4: encode_mma_kernel<T, 4, kRing><<<grid, kMmaWarps * 32, smem, stream>>>(tp); break;
      case 8: encode_mma_kernel<T, 8, kRing><<<grid, kMmaWarps * 32, smem, stream>>>(tp); break;
      case 16: encode_mma_kernel<T, 16, kRing><<<grid, kMmaWarps * 32, smem, stream>>>(tp); break;
      default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
  }
  if (many && floats <= kTiledMaxFloats) {
    dim3 grid((nrows + kTileRows - 1) / kTileRows, p.H, tp.nz[0] + tp.nz[1] + (kRing ? 1 : 0));
    const size_t smem = static_cast<size_t>(floats) * sizeof(float);
    switch (p.c) {
      case 1: encode_tiled_kernel<T, 1, kRing><<<grid, kTileThreads, smem, stream>>>(tp); break;
      case 2: encode_tiled_kernel<T, 2, kRing><<<grid, kTileThreads, smem, stream>>>(tp); break;
      case 4: encode_tiled_kernel<T, 4, kRing><<<grid, kTileThreads, smem, stream>>>(tp); break;
      case 8: encode_tiled_kernel<T, 8, kRing><<<grid, kTileThreads, smem, stream>>>(tp); break;
      case 16: encode_tiled_kernel<T, 16, kRing><<<grid, kTileThreads, smem, stream>>>(tp); break;
      default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
  }
  dim3 grid(nrows, p.H, pp.nz[0] + pp.nz[1] + (kRing ? 1 : 0));
  const int threads = 32 * (p.G < kChunk ? p.G : kChunk);
  switch (p.c) {
    case 1: encode_kernel<T, 1, kRing><<<grid, threads, 0, stream>>>(pp); break;
    case 2: encode_kernel<T, 2, kRing><<<grid, threads, 0, stream>>>(pp); break;
    case 4: encode_kernel<T, 4, kRing><<<grid, threads, 0, stream>>>(pp); break;
    case 8: encode_kernel<T, 8, kRing><<<grid, threads, 0, stream>>>(pp); break;
    case 16: encode_kernel<T, 16, kRing><<<grid, threads, 0, stream>>>(pp); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_pair(const EncodePair& pp, cudaStream_t stream) {
  if (pp.p[0].B * pp.p[0].Q == 0) return cudaSuccess;
  if (pp.has_ring)
    return pp.p[0].dtype == kBF16 ? launch_t<__nv_bfloat16, true>(pp, stream) : launch_t<__half, true>(pp, stream);
  return pp.p[0].dtype == kBF16 ? launch_t<__nv_bfloat16, false>(pp, stream) : launch_t<__half, false>(pp, stream);
}

}  // namespace

cudaError_t launch_encode(const EncodeParams& p, cudaStream_t stream) {
  EncodePair pp{};
  pp.p[0] = p;
  pp.nz[0] = chunks(p);
  pp.gpc[0] = pp.gpc[1] = kChunk;
  return launch_pair(pp, stream);
}

cudaError_t launch_encode_kv(const EncodeParams& k, const EncodeParams& v, cudaStream_t stream, const RingWrite* ring) {
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
  if (ring != nullptr) {
    if (ring->B != k.B || ring->H != k.H || ring->Q != k.Q || (ring->vec && ring->D % 8 != 0)) return cudaErrorInvalidValue;
    pp.has_ring = 1;
    pp.ring = *ring;
  }
  return launch_pair(pp, stream);
}

}  // namespace cq
