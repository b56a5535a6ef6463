// Causal attention from CQ codes for many queries (prefill / evaluation), flash-attention style on tensor cores.
//
// One block per (64 query rows, kv head, batch row); rows are (query, head of the GQA group) pairs, query-major,
// so the group's queries share every dequantized key tile. Per 64-key tile the block unpacks the codes, looks up
// the centroids, applies RoPE (cos/sin table of the cache, fp32) and writes the keys and the transposed values
// to shared memory in the compute dtype; warps then run S = Q K^T and O += P V with mma.sync m16n8k16 and an
// online softmax in fp32. Window/sink semantics are not handled here (ops.py routes those to the reference).
#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"

namespace cq {
namespace {

constexpr int kPfWarps = 4;
constexpr int kBM = 16 * kPfWarps;  // query rows per block
constexpr int kBN = 64;             // keys per tile

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct PfLayout {
  size_t ks, vt, kw, vw, total;
  int nkw, nvw;
};

template <int D>
__host__ __device__ inline PfLayout pf_layout(const AttnParams& p) {
  PfLayout L;
  L.nkw = (kBN * p.k_rb + 6) / 4 + 2;
  L.nvw = (kBN * p.v_rb + 6) / 4 + 2;
  L.ks = 0;
  L.vt = align16(size_t(kBN) * (D + 8) * 2);
  L.kw = L.vt + align16(size_t(D) * (kBN + 8) * 2);
  L.vw = L.kw + align16(size_t(L.nkw) * 4);
  L.total = L.vw + align16(size_t(L.nvw) * 4);
  return L;
}

template <typename T, int D>
__global__ void __launch_bounds__(kPfWarps * 32) prefill_kernel(const AttnParams p) {
  constexpr int KS = D + 8, VS = kBN + 8;  // padded row lengths (elements): conflict-free fragment loads
  constexpr int HALF = D / 2;
  extern __shared__ __align__(16) uint8_t smem[];
  const PfLayout L = pf_layout<D>(p);
  T* Ks = reinterpret_cast<T*>(smem + L.ks);        // [kBN][KS] post-RoPE keys
  T* Vt = reinterpret_cast<T*>(smem + L.vt);        // [D][VS] values, transposed
  uint32_t* kw = reinterpret_cast<uint32_t*>(smem + L.kw);
  uint32_t* vw = reinterpret_cast<uint32_t*>(smem + L.vw);
  __shared__ int kv_range[2];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y;
  const int rep = p.Hq / p.Hkv, M = rep * p.Q;
  const int m0 = blockIdx.x * kBM;

  // ---- this thread's two rows: query index, head, allowed key range
  int row_qi[2], row_hq[2], row_lo[2], row_hi[2];
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + warp * 16 + g + 8 * i;
    row_ok[i] = r < M;
    row_qi[i] = row_ok[i] ? r / rep : 0;
    row_hq[i] = h * rep + (row_ok[i] ? r % rep : 0);
    row_lo[i] = row_ok[i] ? p.range[(b * p.Q + row_qi[i]) * 2] : 0;
    row_hi[i] = row_ok[i] ? p.range[(b * p.Q + row_qi[i]) * 2 + 1] : 0;
  }
  if (threadIdx.x == 0) { kv_range[0] = p.S; kv_range[1] = 0; }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i)
    if (row_ok[i] && row_lo[i] < row_hi[i]) { atomicMin(&kv_range[0], row_lo[i]); atomicMax(&kv_range[1], row_hi[i]); }

  // ---- Q fragments (A operand), rows g and g+8 of this warp
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const T* qp = reinterpret_cast<const T*>(p.q) + b * p.q_sb + row_hq[i] * p.q_sh + row_qi[i] * p.q_sq;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t lo = row_ok[i] ? __ldg(reinterpret_cast<const unsigned int*>(qp + kk * 16 + 2 * t4)) : 0u;
      const uint32_t hi = row_ok[i] ? __ldg(reinterpret_cast<const unsigned int*>(qp + kk * 16 + 8 + 2 * t4)) : 0u;
      qf[kk][i] = lo;
      qf[kk][2 + i] = hi;
    }
  }
  __syncthreads();
  const int kv_lo = kv_range[0], kv_hi = kv_range[1];

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_m[2] = {kNegInf, kNegInf}, row_l[2] = {0.f, 0.f};
  const float sl2 = p.scaling * kLog2e;

  const int Kk = 1 << p.k_bits, Kv = 1 << p.v_bits;
  const int lck = __ffs(p.k_c) - 1, lcv = __ffs(p.v_c) - 1;
  const T* kcent = reinterpret_cast<const T*>(p.k_cent) + static_cast<int64_t>(h) * p.k_groups * Kk * p.k_c;
  const T* vcent = reinterpret_cast<const T*>(p.v_cent) + static_cast<int64_t>(h) * p.v_groups * Kv * p.v_c;
  const int64_t kbase = (static_cast<int64_t>(b) * p.Hkv + h) * p.cap * p.k_rb;
  const int64_t vbase = (static_cast<int64_t>(b) * p.Hkv + h) * p.cap * p.v_rb;
  const float* cos_b = p.cos_t + b * p.cs_sb;
  const float* sin_b = p.sin_t + b * p.cs_sb;

  for (int j0 = kv_lo; j0 < kv_hi; j0 += kBN) {
    const int n = min(kBN, p.S - j0);
    // ---- stage this tile's code rows
    const uint32_t kbit0 = stage_code_words(kw, p.k_codes, kbase, j0, n, p.k_rb);
    const uint32_t vbit0 = stage_code_words(vw, p.v_codes, vbase, j0, n, p.v_rb);
    __syncthreads();

    // ---- dequantize + RoPE the keys: item = (key, 8-pair chunk)
    for (int it = threadIdx.x; it < kBN * (D / 16); it += blockDim.x) {
      const int kn = it / (D / 16), cb = it % (D / 16);
      const int ca = 8 * cb, cbb = HALF + 8 * cb;
      uint4 ua = make_uint4(0, 0, 0, 0), ub = make_uint4(0, 0, 0, 0);
      if (kn < n) {
        const int64_t row = static_cast<int64_t>(j0 + kn) * D;
        rope_key_chunk<T>(ua, ub, kcent, D, lck, Kk, p.k_bits, kw, kbit0 + static_cast<uint32_t>(kn * p.k_rb * 8), ca,
                          cos_b + row, sin_b + row);
      }
      *reinterpret_cast<uint4*>(Ks + kn * KS + ca) = ua;
      *reinterpret_cast<uint4*>(Ks + kn * KS + cbb) = ub;
    }
    // ---- dequantize the values, transposed: item = (8-channel chunk, key)
    for (int it = threadIdx.x; it < kBN * (D / 8); it += blockDim.x) {
      const int kn = it % kBN, cb = it / kBN;
      float v8[8];
      if (kn < n) {
        const uint32_t bit = vbit0 + static_cast<uint32_t>(kn * p.v_rb * 8);
        gather8<T, false, 0>(v8, vcent, D, lcv, Kv, p.v_bits, vw, bit, 8 * cb);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v8[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) Vt[(8 * cb + e) * VS + kn] = from_f<T>(v8[e]);
    }
    __syncthreads();

    // ---- S = Q K^T for this warp's 16 rows x 64 keys
    float s[kBN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const T* kr = Ks + (nt * 8 + g) * KS + kk * 16 + 2 * t4;
        mma16816<T>(s[nt], qf[kk], *reinterpret_cast<const uint32_t*>(kr), *reinterpret_cast<const uint32_t*>(kr + 8));
      }
    }
    // ---- mask, online softmax (log2 domain)
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = kNegInf;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + nt * 8 + 2 * t4 + e;
          float v = s[nt][2 * i + e] * sl2;
          v = (j >= row_lo[i] && j < row_hi[i]) ? v : kNegInf;
          s[nt][2 * i + e] = v;
          mx = fmaxf(mx, v);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(row_m[i], mx);
      const float mu = mn == kNegInf ? 0.f : mn;
      alpha[i] = exp2f(row_m[i] - mu);
      row_m[i] = mn;
      float ls = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(s[nt][2 * i + e] - mu);
          s[nt][2 * i + e] = pv;
          ls += pv;
        }
      row_l[i] = row_l[i] * alpha[i] + ls;
    }
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      o[nd][0] *= alpha[0]; o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1]; o[nd][3] *= alpha[1];
    }
    // ---- O += P V
#pragma unroll
    for (int kp = 0; kp < kBN / 16; ++kp) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kp][0], s[2 * kp][1]);
      pa[1] = pack2<T>(s[2 * kp][2], s[2 * kp][3]);
      pa[2] = pack2<T>(s[2 * kp + 1][0], s[2 * kp + 1][1]);
      pa[3] = pack2<T>(s[2 * kp + 1][2], s[2 * kp + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        const T* vr = Vt + (nd * 8 + g) * VS + kp * 16 + 2 * t4;
        mma16816<T>(o[nd], pa, *reinterpret_cast<const uint32_t*>(vr), *reinterpret_cast<const uint32_t*>(vr + 8));
      }
    }
    __syncthreads();
  }

  // ---- normalise and write out[b, qi, hq, :]
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = row_l[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (!row_ok[i]) continue;
    T* out = reinterpret_cast<T*>(p.out) + b * p.o_sb + row_qi[i] * p.o_sq + row_hq[i] * p.o_sh;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      *reinterpret_cast<uint32_t*>(out + nd * 8 + 2 * t4) = pack2<T>(o[nd][2 * i] * inv, o[nd][2 * i + 1] * inv);
  }
}

template <typename T, int D>
cudaError_t launch_pf(const AttnParams& p, cudaStream_t stream) {
  const size_t smem = pf_layout<D>(p).total;
  static SmemOptIn opt_in;
  if (cudaError_t e = opt_in.ensure(prefill_kernel<T, D>, smem); e != cudaSuccess) return e;
  const int rep = p.Hq / p.Hkv;
  dim3 grid((rep * p.Q + kBM - 1) / kBM, p.Hkv, p.B);
  prefill_kernel<T, D><<<grid, kPfWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pf_t(const AttnParams& p, cudaStream_t stream) {
  if (p.D == 128) return launch_pf<T, 128>(p, stream);
  if (p.D == 64) return launch_pf<T, 64>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_prefill(const AttnParams& p, cudaStream_t stream) {
  if (p.B * p.Q == 0) return cudaSuccess;
  return p.dtype == kBF16 ? launch_pf_t<__nv_bfloat16>(p, stream) : launch_pf_t<__half>(p, stream);
}

}  // namespace cq
