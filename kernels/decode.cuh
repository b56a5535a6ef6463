// Decode attention from CQ codes (one or a few queries per sequence), split-K over the sequence.
//
// One block per (sequence-split, kv head, query chunk, batch row). The block holds the head's K and V centroid
// tables in shared memory (code-major rows: tab[code][channel], so that the lanes of a token read distinct banks),
// streams the packed code rows and positions through a cp.async pipeline, and per token: unpacks the codes,
// looks up the centroids, applies RoPE at the token's position, takes Q.K, updates an online softmax and
// accumulates P.V. Dequantized keys and values only ever live in registers.
//
// Lane mapping: LPT = D/16 lanes per token, each lane owns 8 RoPE pairs (channels 8r..8r+7 and D/2+8r..D/2+8r+7).
// RoPE: a lane's consecutive tokens are STEP apart, so when positions advance by STEP the rotation e^{i p f} is
// advanced by a constant complex factor; it is recomputed exactly (sincosf of fl(p * f), as the reference) on
// any irregular position and every kReinit steps. With one query the rotation is folded into the query
// (W = s * conj(q) * e^{i p f}, score = sum Re(W k)), with several it is applied to the key.
// The last split (when has_fp) handles the full-precision keys: sinks and the recent window.
#pragma once

#include <cstdlib>

#include "common.cuh"
#include "kernels.h"

namespace cq {

constexpr int kStages = 3;
constexpr int kReinit = 128;
constexpr int kMaxWarps = 16;

// One query per block: 16 warps (few registers per thread); several: 8 warps (more registers per thread).
template <int NQ>
__host__ __device__ constexpr int dec_warps() { return NQ == 1 ? 16 : 8; }

template <int D, int NW>
struct DecGeom {
  static constexpr int LPT = D / 16;
  static constexpr int TPW = 32 / LPT;
  static constexpr int STEP = NW * TPW;
  static constexpr int HALF = D / 2;
};

struct DecLayout {
  size_t tab_k, tab_v, stage, stage_bytes, kw, vw, pos, red, total;
};

__host__ __device__ inline size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

__host__ __device__ inline DecLayout dec_layout(const AttnParams& p, int nq) {
  const int nw = nq == 1 ? 16 : 8;
  DecLayout L;
  size_t off = 0;
  L.tab_k = off;
  if (p.tab_smem) off += align16(size_t(1) << p.k_bits) * p.D * 2;
  L.tab_v = off;
  if (p.tab_smem) off += align16(size_t(1) << p.v_bits) * p.D * 2;
  L.stage = off;
  const size_t kwords = (size_t(p.tile) * p.k_rb + 6) / 4 + 2;
  const size_t vwords = (size_t(p.tile) * p.v_rb + 6) / 4 + 2;
  L.kw = 0;
  L.vw = align16(kwords * 4);
  L.pos = L.vw + align16(vwords * 4);
  L.stage_bytes = L.pos + size_t(p.tile) * 8;
  off += kStages * L.stage_bytes;
  L.red = off;
  off += size_t(nw) * nq * (p.D + 2) * 4;
  L.total = off;
  return L;
}

// 8 consecutive channels ch0..ch0+7 of a token's dequantized vector (before RoPE for keys). W = min(c, 8) chunk
// width at compile time (no branches in the hot loop), or 0: dispatch on c at run time. lc = log2(c).
template <typename T, bool TSMEM, int W>
__device__ __forceinline__ void gather8(float* out, const T* tab, int D, int lc, int K, int bits, const uint32_t* words,
                                        uint32_t bit0, int ch0) {
  if constexpr (W == 0) {
    switch (lc) {
      case 0: gather8<T, TSMEM, 1>(out, tab, D, lc, K, bits, words, bit0, ch0); break;
      case 1: gather8<T, TSMEM, 2>(out, tab, D, lc, K, bits, words, bit0, ch0); break;
      case 2: gather8<T, TSMEM, 4>(out, tab, D, lc, K, bits, words, bit0, ch0); break;
      default: gather8<T, TSMEM, 8>(out, tab, D, lc, K, bits, words, bit0, ch0); break;
    }
  } else {
    const uint32_t mask = (1u << bits) - 1u;
#pragma unroll
    for (int j = 0; j < 8 / W; ++j) {
      const int ch = ch0 + j * W, g = ch >> lc;
      const uint32_t code = code_from_words(words, bit0 + g * bits, mask);
      if constexpr (TSMEM) load_vec<T, W>(tab + code * D + ch, out + j * W);
      else load_vec_g<T, W>(tab + ((static_cast<int64_t>(g) * K + code) << lc) + (ch & ((1 << lc) - 1)), out + j * W);
    }
  }
}

// Stage the code words of rows j0 .. j0 + n - 1 of one head (row 0 at byte `base` of `codes`, rb bytes per row) in
// words[] from the 4-byte boundary below, plus a zero word after them (code_from_words reads one word on); returns
// the bit of row j0 in words[]. The caller syncs the block before reading.
__device__ __forceinline__ uint32_t stage_code_words(uint32_t* words, const uint8_t* codes, int64_t base, int j0, int n,
                                                     int rb) {
  const int64_t s = base + static_cast<int64_t>(j0) * rb, a = s & ~int64_t(3);
  const int nw = static_cast<int>((s + static_cast<int64_t>(n) * rb - a + 3) >> 2);
  for (int i = threadIdx.x; i < nw; i += blockDim.x) words[i] = __ldg(reinterpret_cast<const unsigned int*>(codes + a) + i);
  if (threadIdx.x == 0) words[nw] = 0u;
  return static_cast<uint32_t>((s - a) * 8);
}

// One cached key's 8 channel pairs (channels ca .. ca + 7 and their RoPE partners + D/2): centroid lookup, rotation
// in fp32 with the cos/sin table row of its position (fp32 [D], transformers' layout), rounded once to the dtype.
template <typename T>
__device__ __forceinline__ void rope_key_chunk(uint4& ua, uint4& ub, const T* kcent, int D, int lck, int Kk, int bits,
                                               const uint32_t* kw, uint32_t bit, int ca, const float* cos_row,
                                               const float* sin_row) {
  float a8[8], b8[8];
  gather8<T, false, 0>(a8, kcent, D, lck, Kk, bits, kw, bit, ca);
  gather8<T, false, 0>(b8, kcent, D, lck, Kk, bits, kw, bit, ca + D / 2);
  const float4* cp = reinterpret_cast<const float4*>(cos_row + ca);
  const float4* sp = reinterpret_cast<const float4*>(sin_row + ca);
  const float4 c0 = __ldg(cp), c1 = __ldg(cp + 1), s0 = __ldg(sp), s1 = __ldg(sp + 1);
  const float cs[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
  const float sn[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
  float ra[8], rb[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    ra[e] = a8[e] * cs[e] - b8[e] * sn[e];
    rb[e] = b8[e] * cs[e] + a8[e] * sn[e];
  }
  ua = make_uint4(pack2<T>(ra[0], ra[1]), pack2<T>(ra[2], ra[3]), pack2<T>(ra[4], ra[5]), pack2<T>(ra[6], ra[7]));
  ub = make_uint4(pack2<T>(rb[0], rb[1]), pack2<T>(rb[2], rb[3]), pack2<T>(rb[4], rb[5]), pack2<T>(rb[6], rb[7]));
}

// Partial scores of one token over 8 channel pairs (ka: channels ch_a.., kb: their RoPE partners). NQ == 1: w holds
// the query already rotated to the token's position (s = Re(W k)); NQ > 1: w is e^{i p f} and the key is rotated
// here, then dotted with each query's channels qa, qb.
template <int NQ>
__device__ __forceinline__ void rotated_scores(const float2 (&w)[8], const float (&ka)[8], const float (&kb)[8],
                                               const float (&qa)[NQ][8], const float (&qb)[NQ][8], float (&s)[NQ]) {
  if constexpr (NQ == 1) {
    float a0 = 0.f, a1 = 0.f;
#pragma unroll
    for (int m = 0; m < 8; ++m) { a0 = fmaf(w[m].x, ka[m], a0); a1 = fmaf(w[m].y, kb[m], a1); }
    s[0] = a0 - a1;
  } else {
#pragma unroll
    for (int q = 0; q < NQ; ++q) s[q] = 0.f;
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      const float kr = ka[m] * w[m].x - kb[m] * w[m].y;
      const float ki = kb[m] * w[m].x + ka[m] * w[m].y;
#pragma unroll
      for (int q = 0; q < NQ; ++q) s[q] = fmaf(qa[q][m], kr, fmaf(qb[q][m], ki, s[q]));
    }
  }
}

__host__ __device__ inline int ilog2(int c) {  // c a power of two
  int l = 0;
  while ((1 << l) < c) ++l;
  return l;
}

// One (batch row, kv head)'s code rows (byte offsets of row 0 in k_codes / v_codes) and centroids.
template <typename T>
struct HeadCodes {
  const T* kcent;
  const T* vcent;
  int64_t kbase, vbase;
  int Kk, Kv, lck, lcv;  // 2**bits and log2(c) of K and V
  __device__ HeadCodes(const AttnParams& p, int b, int h)
      : kcent(reinterpret_cast<const T*>(p.k_cent) + static_cast<int64_t>(h) * p.k_groups * (1 << p.k_bits) * p.k_c),
        vcent(reinterpret_cast<const T*>(p.v_cent) + static_cast<int64_t>(h) * p.v_groups * (1 << p.v_bits) * p.v_c),
        kbase((static_cast<int64_t>(b) * p.Hkv + h) * p.cap * p.k_rb),
        vbase((static_cast<int64_t>(b) * p.Hkv + h) * p.cap * p.v_rb),
        Kk(1 << p.k_bits), Kv(1 << p.v_bits), lck(ilog2(p.k_c)), lcv(ilog2(p.v_c)) {}
};

// Copy one head's centroids into the code-major table tab[K][D]: from the code-major rows [K][D] when the caller has
// them (a linear copy), else from [G, K, c] (asynchronously where c >= 2).
template <typename T>
__device__ void load_table(T* tab, const T* rows, const T* cent, int D, int c, int K) {
  if (rows != nullptr) {
    for (int i = threadIdx.x; i < K * D / 8; i += blockDim.x) cp_async16(tab + i * 8, rows + i * 8);
  } else if (c >= 8) {
    const int chunks = K * (D / 8);
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
      const int code = i / (D / 8), ch0 = (i % (D / 8)) * 8;
      cp_async16(tab + code * D + ch0, cent + (static_cast<int64_t>(ch0 / c) * K + code) * c + ch0 % c);
    }
  } else if (c >= 2) {
    const int chunks = K * (D / c);
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
      const int code = i / (D / c), g = i % (D / c);
      const T* src = cent + (static_cast<int64_t>(g) * K + code) * c;
      if (c == 4) cp_async8(tab + code * D + g * c, src);
      else cp_async4(tab + code * D + g * c, src);
    }
  } else {
    for (int i = threadIdx.x; i < K * D; i += blockDim.x) {
      const int code = i / D, g = i % D;
      tab[code * D + g] = cent[static_cast<int64_t>(g) * K + code];
    }
  }
}

template <int LPT>
__device__ __forceinline__ float token_sum(float x) {
#pragma unroll
  for (int off = 1; off < LPT; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Online-softmax state of one lane: its token slot's running max, sum and 16 output channels per query.
template <int NQ>
struct SoftmaxAcc {
  float m[NQ], l[NQ], acc[NQ][16];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      m[q] = kNegInf; l[q] = 0.f;
#pragma unroll
      for (int e = 0; e < 16; ++e) acc[q][e] = 0.f;
    }
  }

  // s: scores in log2 units (kNegInf where not allowed) -> p; returns whether any p is non-zero.
  __device__ __forceinline__ bool update(float* s) {
    bool any = false;
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      // lazy rescale: the reference max only moves when a score exceeds it by 8 (p stays <= 256)
      if (s[q] > m[q] + 8.f) {
        const float a = exp2f(m[q] - s[q]);
        l[q] *= a;
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[q][e] *= a;
        m[q] = s[q];
      }
      s[q] = s[q] == kNegInf ? 0.f : exp2f(s[q] - m[q]);
      l[q] += s[q];
      any |= s[q] != 0.f;
    }
    return any;
  }

  __device__ __forceinline__ void add_v(const float* p, const float* v) {
#pragma unroll
    for (int q = 0; q < NQ; ++q)
#pragma unroll
      for (int e = 0; e < 16; ++e) acc[q][e] = fmaf(p[q], v[e], acc[q][e]);
  }

  // Merge the states of lanes `off` apart (other token slots of the warp).
  __device__ __forceinline__ void merge_shfl(int off) {
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[q], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[q], off);
      const float mn = fmaxf(m[q], mo);
      const float a = m[q] == kNegInf ? 0.f : exp2f(m[q] - mn);
      const float bb = mo == kNegInf ? 0.f : exp2f(mo - mn);
      l[q] = l[q] * a + lo * bb;
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[q][e], off);
        acc[q][e] = acc[q][e] * a + ao * bb;
      }
      m[q] = mn;
    }
  }
};

template <typename T, int D, int NQ, bool TSMEM, int CH>
__global__ void __launch_bounds__(dec_warps<NQ>() * 32, 1) decode_kernel(const AttnParams p) {
  constexpr int NW = dec_warps<NQ>();
  using Geo = DecGeom<D, NW>;
  constexpr int LPT = Geo::LPT, TPW = Geo::TPW, STEP = Geo::STEP, HALF = Geo::HALF;
  extern __shared__ __align__(16) uint8_t smem[];
  const DecLayout L = dec_layout(p, NQ);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = lane / LPT, r = lane % LPT;
  const int b = blockIdx.z, h = blockIdx.y / p.nchunk, chunk = blockIdx.y % p.nchunk;
  const int split = blockIdx.x;
  const int rep = p.Hq / p.Hkv;
  const bool fp_block = p.has_fp && split == p.nsplit - 1;
  const int ncode = p.nsplit - p.has_fp;
  const int ch_a = 8 * r, ch_b = HALF + 8 * r;  // this lane's two 8-channel blocks

  // ---- queries of this block and their key ranges
  int hq[NQ], qi[NQ], clo[NQ], chi[NQ], mlo[NQ], mhi[NQ];
  bool qok[NQ];
  int cmin = p.S, cmax = 0;
  const int start = query_start(p);
#pragma unroll
  for (int q = 0; q < NQ; ++q) {
    const int idx = chunk * NQ + q;
    qok[q] = idx < rep * p.Q;
    const int hh = qok[q] ? idx / p.Q : 0;
    qi[q] = qok[q] ? idx % p.Q : 0;
    hq[q] = h * rep + hh;
    mlo[q] = qok[q] ? p.range[(b * p.Q + qi[q]) * 2] : 0;
    mhi[q] = qok[q] ? p.range[(b * p.Q + qi[q]) * 2 + 1] : 0;
    // keys j < code_hi are read through codes (window semantics of attention.attend_codes_reference)
    const int code_hi = p.window > 0 ? max(0, start + qi[q] - p.window + 1) : p.S;
    clo[q] = max(mlo[q], p.n_sink);
    chi[q] = min(mhi[q], code_hi);
    if (clo[q] < chi[q]) { cmin = min(cmin, clo[q]); cmax = max(cmax, chi[q]); }
  }

  SoftmaxAcc<NQ> st;
  st.init();
  const float qscale = p.scaling * kLog2e * (fp_block ? 1.f : p.rope_scale);
  float qa[NQ][8], qb[NQ][8];  // query channels ch_a.., ch_b.. (scaled)
#pragma unroll
  for (int q = 0; q < NQ; ++q) {
    const T* qp = reinterpret_cast<const T*>(p.q) + b * p.q_sb + hq[q] * p.q_sh + qi[q] * p.q_sq;
    load_vec_g<T, 8>(qp + ch_a, qa[q]);
    load_vec_g<T, 8>(qp + ch_b, qb[q]);
#pragma unroll
    for (int m = 0; m < 8; ++m) { qa[q][m] *= qscale; qb[q][m] *= qscale; }
  }

  if (fp_block) {
    // ---- full-precision keys: sinks [0, n_sink) and the window [fp_lo, fp_hi)
    int fp_lo = p.S, fp_hi = 0;
#pragma unroll
    for (int q = 0; q < NQ; ++q)
      if (qok[q]) {
        fp_lo = min(fp_lo, p.window > 0 ? max(0, start + qi[q] - p.window + 1) : p.S);
        fp_hi = max(fp_hi, mhi[q]);
      }
    fp_lo = max(fp_lo, p.n_sink);
    const int nf = p.n_sink + max(0, min(p.S, fp_hi) - fp_lo);
    for (int base = 0; base < nf; base += STEP) {
      const int u0 = base + warp * TPW + slot;
      const bool active = u0 < nf;
      const int u = active ? u0 : 0;
      const int j = u < p.n_sink ? u : fp_lo + (u - p.n_sink);
      // full-precision source of key j: sinks, the new tokens, or the window kept from earlier steps (or its ring)
      const FpRow f = fp_row(p, j, start);
      const T* kp = reinterpret_cast<const T*>(f.k.data) + b * f.k.sb + h * f.k.sh + f.row * f.k.st;
      const T* vp = reinterpret_cast<const T*>(f.v.data) + b * f.v.sb + h * f.v.sh + f.row * f.v.st;
      float ka[8], kbv[8], v[16];
      load_vec_g<T, 8>(kp + ch_a, ka);
      load_vec_g<T, 8>(kp + ch_b, kbv);
      load_vec_g<T, 8>(vp + ch_a, v);
      load_vec_g<T, 8>(vp + ch_b, v + 8);
      float s[NQ];
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        float a0 = 0.f, a1 = 0.f;
#pragma unroll
        for (int m = 0; m < 8; ++m) { a0 = fmaf(qa[q][m], ka[m], a0); a1 = fmaf(qb[q][m], kbv[m], a1); }
        s[q] = token_sum<LPT>(a0 + a1);
        const int code_hi = p.window > 0 ? max(0, start + qi[q] - p.window + 1) : p.S;
        const bool ok = active && qok[q] && j >= mlo[q] && j < mhi[q] && (j < p.n_sink || j >= code_hi);
        s[q] = ok ? s[q] : kNegInf;
      }
      st.update(s);
      st.add_v(s, v);
    }
  } else if (cmin < cmax) {
    // ---- codes: this split's share of [cmin, cmax)
    const int per = (cmax - cmin + ncode - 1) / ncode;
    const int t_begin = cmin + split * per;
    const int t_end = min(cmax, t_begin + per);
    const HeadCodes<T> hc(p, b, h);
    const int Kk = hc.Kk, Kv = hc.Kv, lck = hc.lck, lcv = hc.lcv;
    const T *kcent = hc.kcent, *vcent = hc.vcent;
    const int64_t kbase = hc.kbase, vbase = hc.vbase;
    const int64_t* pos_g = p.positions + b * p.pos_sb;

    auto load_tile = [&](int stage, int t0) {
      const int n = min(p.tile, t_end - t0);
      uint8_t* sp = smem + L.stage + stage * L.stage_bytes;
      uint32_t* kw = reinterpret_cast<uint32_t*>(sp + L.kw);
      uint32_t* vw = reinterpret_cast<uint32_t*>(sp + L.vw);
      int64_t* ps = reinterpret_cast<int64_t*>(sp + L.pos);
      const int64_t ks = kbase + static_cast<int64_t>(t0) * p.k_rb, ka = ks & ~int64_t(3);
      const int nkw = static_cast<int>((ks + static_cast<int64_t>(n) * p.k_rb - ka + 3) >> 2);
      for (int i = threadIdx.x; i < nkw; i += blockDim.x) cp_async4(kw + i, p.k_codes + ka + 4 * i);
      const int64_t vs = vbase + static_cast<int64_t>(t0) * p.v_rb, va = vs & ~int64_t(3);
      const int nvw = static_cast<int>((vs + static_cast<int64_t>(n) * p.v_rb - va + 3) >> 2);
      for (int i = threadIdx.x; i < nvw; i += blockDim.x) cp_async4(vw + i, p.v_codes + va + 4 * i);
      for (int i = threadIdx.x; i < n; i += blockDim.x) cp_async8(ps + i, pos_g + t0 + i);
    };

    T* tab_k = reinterpret_cast<T*>(smem + L.tab_k);
    T* tab_v = reinterpret_cast<T*>(smem + L.tab_v);
    if constexpr (TSMEM) {  // in the first cp.async group, with tile 0
      const T* krows = p.k_tab ? reinterpret_cast<const T*>(p.k_tab) + static_cast<int64_t>(h) * Kk * D : nullptr;
      const T* vrows = p.v_tab ? reinterpret_cast<const T*>(p.v_tab) + static_cast<int64_t>(h) * Kv * D : nullptr;
      load_table<T>(tab_k, krows, kcent, D, p.k_c, Kk);
      load_table<T>(tab_v, vrows, vcent, D, p.v_c, Kv);
    }
    const int ntile = t_end > t_begin ? (t_end - t_begin + p.tile - 1) / p.tile : 0;
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      if (s < ntile) load_tile(s, t_begin + s * p.tile);
      cp_async_commit();
    }
    const T* tk = TSMEM ? tab_k : kcent;
    const T* tv = TSMEM ? tab_v : vcent;

    // RoPE state of this lane's 8 frequencies, advanced by e^{i STEP f} while positions are regular
    float fr[8];
    float2 rot[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      fr[m] = p.inv_freq[ch_a + m];
      float sn, cs;
      sincosf(static_cast<float>(STEP) * fr[m], &sn, &cs);
      rot[m] = make_float2(cs, sn);
    }
    float2 w[8];  // NQ == 1: W = s conj(q) e^{i p f}; NQ > 1: e^{i p f}
    auto exact_rotation = [&](int64_t pos) {
      const float fp = static_cast<float>(pos);
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        float sn, cs;
        sincosf(fp * fr[m], &sn, &cs);
        if constexpr (NQ == 1) w[m] = make_float2(qa[0][m] * cs + qb[0][m] * sn, qa[0][m] * sn - qb[0][m] * cs);
        else w[m] = make_float2(cs, sn);
      }
    };
    if constexpr (CH != 0) {
      // ---- fast path: 8-bit codes (one byte per group), tables in shared memory, compile-time gather width
      bool w_ok = false;  // w holds the rotation of this lane's next token
      int since = 0;
      int64_t prev_p0 = 0;
      const int lane_off = warp * TPW + slot;
      for (int it = 0; it < ntile; ++it) {
        cp_async_wait<kStages - 1>();
        __syncthreads();
        const int stage = it % kStages;
        const int t0 = t_begin + it * p.tile;
        const int n = min(p.tile, t_end - t0);
        const uint8_t* sp = smem + L.stage + stage * L.stage_bytes;
        const uint8_t* kbytes = sp + L.kw + ((kbase + static_cast<int64_t>(t0) * p.k_rb) & 3);
        const uint8_t* vbytes = sp + L.vw + ((vbase + static_cast<int64_t>(t0) * p.v_rb) & 3);
        const int64_t* ps = reinterpret_cast<const int64_t*>(sp + L.pos);
        const int64_t p0 = ps[0];
        bool reg = true;
        for (int i = threadIdx.x; i < n; i += blockDim.x) reg &= ps[i] == p0 + i;
        reg = __syncthreads_and(reg);
        w_ok = w_ok && reg && p0 == prev_p0 + p.tile && since < kReinit;
        prev_p0 = p0;
        if (reg && !w_ok) {
          exact_rotation(p0 + lane_off);
          since = 0;
        }
        int lo_rel[NQ], hi_rel[NQ];  // allowed token offsets within the tile, per query
#pragma unroll
        for (int q = 0; q < NQ; ++q) { lo_rel[q] = clo[q] - t0; hi_rel[q] = min(chi[q] - t0, n); }
        const int nsteps = p.tile / STEP;
        for (int k = 0; k < nsteps; ++k) {
          const int tl0 = k * STEP + lane_off;
          const int tl = tl0 < n ? tl0 : 0;
          if (!reg) exact_rotation(ps[tl]);
          const uint8_t* krow = kbytes + tl * p.k_rb;
          const uint8_t* vrow = vbytes + tl * p.v_rb;
          float ka[8], kb[8], v[16];
#pragma unroll
          for (int j = 0; j < 8 / CH; ++j) {
            const int ca = ch_a + j * CH, cb = ch_b + j * CH;
            load_vec<T, CH>(tk + krow[ca >> lck] * D + ca, ka + j * CH);
            load_vec<T, CH>(tk + krow[cb >> lck] * D + cb, kb + j * CH);
            load_vec<T, CH>(tv + vrow[ca >> lcv] * D + ca, v + j * CH);
            load_vec<T, CH>(tv + vrow[cb >> lcv] * D + cb, v + 8 + j * CH);
          }
          float s[NQ];
          rotated_scores<NQ>(w, ka, kb, qa, qb, s);
          // advance the rotation to this lane's next token (STEP positions on)
#pragma unroll
          for (int m = 0; m < 8; ++m)
            w[m] = make_float2(w[m].x * rot[m].x - w[m].y * rot[m].y, w[m].x * rot[m].y + w[m].y * rot[m].x);
#pragma unroll
          for (int q = 0; q < NQ; ++q) {
            s[q] = token_sum<LPT>(s[q]);
            const bool ok = tl0 >= lo_rel[q] && tl0 < hi_rel[q];
            if (s[q] > st.m[q] + 8.f && ok) {  // lazy rescale (rare)
              const float a = fast_exp2(st.m[q] - s[q]);
              st.l[q] *= a;
#pragma unroll
              for (int e = 0; e < 16; ++e) st.acc[q][e] *= a;
              st.m[q] = s[q];
            }
            s[q] = ok ? fast_exp2(s[q] - st.m[q]) : 0.f;
            st.l[q] += s[q];
          }
          st.add_v(s, v);
        }
        since += nsteps;
        w_ok = reg;
        __syncthreads();
        if (it + kStages < ntile) load_tile(stage, t_begin + (it + kStages) * p.tile);
        cp_async_commit();
      }
    } else {
      bool w_ok = false;  // w holds the rotation of this lane's previous token
      int since = 0;
      int64_t prev_p0 = 0;

      for (int it = 0; it < ntile; ++it) {
        cp_async_wait<kStages - 1>();
        __syncthreads();
        const int stage = it % kStages;
        const int t0 = t_begin + it * p.tile;
        const int n = min(p.tile, t_end - t0);
        const uint8_t* sp = smem + L.stage + stage * L.stage_bytes;
        const uint32_t* kw = reinterpret_cast<const uint32_t*>(sp + L.kw);
        const uint32_t* vw = reinterpret_cast<const uint32_t*>(sp + L.vw);
        const int64_t* ps = reinterpret_cast<const int64_t*>(sp + L.pos);
        // positions p0, p0+1, ... across the tile (and following the previous tile) -> no per-token sincos
        const int64_t p0 = ps[0];
        bool reg = true;
        for (int i = threadIdx.x; i < n; i += blockDim.x) reg &= ps[i] == p0 + i;
        reg = __syncthreads_and(reg);
        w_ok = w_ok && reg && p0 == prev_p0 + p.tile;
        prev_p0 = p0;
        const uint32_t kbit0 = static_cast<uint32_t>(((kbase + static_cast<int64_t>(t0) * p.k_rb) & 3) * 8);
        const uint32_t vbit0 = static_cast<uint32_t>(((vbase + static_cast<int64_t>(t0) * p.v_rb) & 3) * 8);
        const int nsteps = p.tile / STEP;
        for (int k = 0; k < nsteps; ++k) {
          const int tl0 = k * STEP + warp * TPW + slot;
          const bool active = tl0 < n;
          const int tl = active ? tl0 : 0;
          const int t = t0 + tl;
          if (w_ok && reg && since < kReinit) {
            ++since;
#pragma unroll
            for (int m = 0; m < 8; ++m)
              w[m] = make_float2(w[m].x * rot[m].x - w[m].y * rot[m].y, w[m].x * rot[m].y + w[m].y * rot[m].x);
          } else {
            since = 0;
            const float fp = static_cast<float>(ps[tl]);
#pragma unroll
            for (int m = 0; m < 8; ++m) {
              float sn, cs;
              sincosf(fp * fr[m], &sn, &cs);
              if constexpr (NQ == 1) w[m] = make_float2(qa[0][m] * cs + qb[0][m] * sn, qa[0][m] * sn - qb[0][m] * cs);
              else w[m] = make_float2(cs, sn);
            }
          }
          w_ok = reg;

          const uint32_t kb0 = kbit0 + static_cast<uint32_t>(tl * p.k_rb * 8);
          const uint32_t vb0 = vbit0 + static_cast<uint32_t>(tl * p.v_rb * 8);
          float ka[8], kb[8], v[16];
          gather8<T, TSMEM, CH>(ka, tk, D, lck, Kk, p.k_bits, kw, kb0, ch_a);
          gather8<T, TSMEM, CH>(kb, tk, D, lck, Kk, p.k_bits, kw, kb0, ch_b);
          gather8<T, TSMEM, CH>(v, tv, D, lcv, Kv, p.v_bits, vw, vb0, ch_a);
          gather8<T, TSMEM, CH>(v + 8, tv, D, lcv, Kv, p.v_bits, vw, vb0, ch_b);
          float s[NQ];
          rotated_scores<NQ>(w, ka, kb, qa, qb, s);
#pragma unroll
          for (int q = 0; q < NQ; ++q) {
            s[q] = token_sum<LPT>(s[q]);
            const bool ok = active && t >= clo[q] && t < chi[q];
            s[q] = ok ? s[q] : kNegInf;
          }
          st.update(s);
          st.add_v(s, v);
        }
        __syncthreads();
        if (it + kStages < ntile) load_tile(stage, t_begin + (it + kStages) * p.tile);
        cp_async_commit();
      }
    }
    cp_async_wait<0>();
  }

  // ---- combine the token slots of each warp, then the warps
#pragma unroll
  for (int off = LPT; off < 32; off <<= 1) st.merge_shfl(off);
  float* red = reinterpret_cast<float*>(smem + L.red);  // [warps][NQ][D + 2]
  if (slot == 0) {
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      float* rw = red + (warp * NQ + q) * (D + 2);
#pragma unroll
      for (int e = 0; e < 8; ++e) { rw[ch_a + e] = st.acc[q][e]; rw[ch_b + e] = st.acc[q][8 + e]; }
      if (r == 0) { rw[D] = st.m[q]; rw[D + 1] = st.l[q]; }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < NQ * D; i += blockDim.x) {
    const int q = i / D, ch = i % D;
    float M = kNegInf;
#pragma unroll
    for (int wi = 0; wi < NW; ++wi) M = fmaxf(M, red[(wi * NQ + q) * (D + 2) + D]);
    float lsum = 0.f, o = 0.f;
    if (M != kNegInf) {
#pragma unroll
      for (int wi = 0; wi < NW; ++wi) {
        const float* rw = red + (wi * NQ + q) * (D + 2);
        if (rw[D] == kNegInf) continue;
        const float a = exp2f(rw[D] - M);
        lsum += rw[D + 1] * a;
        o += rw[ch] * a;
      }
    }
    // the query's index (registers are indexed by compile-time q only)
    int my_hq = 0, my_qi = 0;
    bool ok = false;
#pragma unroll
    for (int qq = 0; qq < NQ; ++qq)
      if (qq == q) { my_hq = hq[qq]; my_qi = qi[qq]; ok = qok[qq]; }
    if (!ok) continue;
    if (p.nsplit == 1) {
      T* out = reinterpret_cast<T*>(p.out) + b * p.o_sb + my_qi * p.o_sq + my_hq * p.o_sh;
      out[ch] = from_f<T>(lsum > 0.f ? o / lsum : 0.f);
    } else {
      const int64_t row = ((static_cast<int64_t>(b) * p.Hq + my_hq) * p.Q + my_qi) * p.nsplit + split;
      p.ws_o[row * D + ch] = o;
      if (ch == 0) { p.ws_ml[row * 2] = M; p.ws_ml[row * 2 + 1] = lsum; }
    }
  }
}

// out[b, q, hq, :] = merge over splits of (m, l, o) partials (log2 domain).
template <typename T>
__global__ void combine_kernel(const AttnParams p) {
  const int row = blockIdx.x;  // (b * Hq + hq) * Q + qi
  const int qi = row % p.Q, hq = (row / p.Q) % p.Hq, b = row / (p.Q * p.Hq);
  const float* ml = p.ws_ml + static_cast<int64_t>(row) * p.nsplit * 2;
  float M = kNegInf;
  for (int s = 0; s < p.nsplit; ++s) M = fmaxf(M, ml[2 * s]);
  T* out = reinterpret_cast<T*>(p.out) + b * p.o_sb + qi * p.o_sq + hq * p.o_sh;
  for (int ch = threadIdx.x; ch < p.D; ch += blockDim.x) {
    float l = 0.f, o = 0.f;
    if (M != kNegInf) {
      for (int s = 0; s < p.nsplit; ++s) {
        const float m = ml[2 * s];
        if (m == kNegInf) continue;
        const float a = exp2f(m - M);
        l += ml[2 * s + 1] * a;
        o += p.ws_o[(static_cast<int64_t>(row) * p.nsplit + s) * p.D + ch] * a;
      }
    }
    out[ch] = from_f<T>(l > 0.f ? o / l : 0.f);
  }
}

template <typename T, int D, int NQ, bool TSMEM, int CH>
cudaError_t launch_t(const AttnParams& p, cudaStream_t stream) {
  const size_t smem = dec_layout(p, NQ).total;
  static SmemOptIn opt_in;  // raise the dynamic shared-memory limit (per device) only when a launch needs more
  if (cudaError_t e = opt_in.ensure(decode_kernel<T, D, NQ, TSMEM, CH>, smem); e != cudaSuccess) return e;
  dim3 grid(p.nsplit, p.Hkv * p.nchunk, p.B);
  decode_kernel<T, D, NQ, TSMEM, CH><<<grid, dec_warps<NQ>() * 32, smem, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p.nsplit == 1) return e;
  combine_kernel<T><<<p.B * p.Hq * p.Q, p.D, 0, stream>>>(p);
  return cudaGetLastError();
}

// Fast path: 8-bit codes, tables in shared memory, one compile-time gather width for K and V (c >= 8 -> 8,
// c == 4 -> 4). Everything else takes the generic loop (run-time c and b). CQTOOL_NO_FAST_DECODE=1 turns it off.
inline bool fast_decode_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("CQTOOL_NO_FAST_DECODE");
    return !(e && *e && *e != '0');
  }();
  return on;
}

template <typename T, int D, int NQ>
cudaError_t launch_q(const AttnParams& p, cudaStream_t stream) {
  const int wk = p.k_c >= 8 ? 8 : p.k_c, wv = p.v_c >= 8 ? 8 : p.v_c;
  const bool fast = p.tab_smem && p.k_bits == 8 && p.v_bits == 8 && wk == wv && fast_decode_enabled();
  if (fast && wk == 8) return launch_t<T, D, NQ, true, 8>(p, stream);
  if (fast && wk == 4) return launch_t<T, D, NQ, true, 4>(p, stream);
  return p.tab_smem ? launch_t<T, D, NQ, true, 0>(p, stream) : launch_t<T, D, NQ, false, 0>(p, stream);
}

template <typename T, int D>
cudaError_t launch_d(const AttnParams& p, cudaStream_t stream) {
  return p.nq == 1 ? launch_q<T, D, 1>(p, stream) : launch_q<T, D, 4>(p, stream);
}

}  // namespace cq
