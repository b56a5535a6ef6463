// Decode attention from CQ codes with the scores on the tensor cores and P.V as a code histogram.
//
// Applies to one query (Q == 1) per query head, head_dim 128, 8-bit codes with c = 8 for keys and values, or c = 4 for
// both with 8 warps (CQ-4c8b; GQA in blocks of 2 heads; see Cfg) (mma_decode_applies); everything else runs decode.cuh.
// This kernel reads the keys held as codes; a full-precision window and sinks are one more split (fp_split_kernel in
// decode.cu), merged by the split-K combine. GQA (8 warps): a group runs as ceil(group / 4) blocks of R = 2, 3 or 4
// query heads (8 = 4 + 4, 6 = 3 + 3; when R does not divide the group the last block overlaps the one before and writes
// only its own heads: 7 = heads 0-3 and 3-6), so that each key is gathered and rotated once for the R heads, and one
// MMA chain scores all of them (their query columns packed into one n-tile); the softmax and the value scatter are per
// query head. MHA, the 16-warp variant and variant 3 (GQA too): a block per query head (R = 1).
//
// Blocks. At most one block per SM (a block fills one); each takes a contiguous run of the kv-head-major items (R query
// heads, batch row, split), keeps the key tables while its items share the kv head, and issues the next item's table
// and first-stage loads as soon as the current item's last scatter is done, so that they overlap its epilogue
// (H100: 13 -> 6 us of fixed cost per item; docs/RESULTS_kernels.md).
//
// Scores. A tile is kTile = 512 consecutive tokens at positions P + o. Write o = 64 n + tau (n = 0..7, tau = 0..63):
//   q . R(P + o) k = (R(P + 64 n)^T q) . (R(tau) k)
// The eight rotated queries ("columns", computed once per tile and block, exact fp32 angles) of each query head are
// the B operand of mma.m16n8k16 (fp32 accumulation; one 8-column n-tile per query head); each key, rotated by R(tau)
// in packed 16-bit math with constants that are fixed per thread (tau = 8 warp + lane / 4), is a row of the A
// operand. Row lane/4 of an m-tile pairs with an even column, row lane/4 + 8 with the next odd one, so each m-tile
// yields 16 scores per query head (its other 112 products are not used).
// Tiles whose positions are not P, P+1, ... rotate each key exactly at its own position (sincosf) instead.
// Key centroids come from a code-major table in shared memory. With R = 1 it is held twice, the second copy with its
// 128-byte halves swapped: the two keys a quarter-warp gathers then always fall on different banks (with R > 1 that
// shared memory holds the group's histograms instead, and half of the gathers meet a 2-way bank conflict).
//
// Values. p = 2^(s - m) (m: the query head's running max, raised tile by tile, so p <= 1) is added as 22-bit fixed
// point into a histogram hist[code][slots] per query head in shared memory with integer atomics (slot = value group +
// 16 * replica; with two replicas (R <= 2) a warp's 32 atomics hit 32 banks; with one (R = 3, 4) the heads' histograms
// lie 16 banks apart and a warp's atomics pair two heads of one token; MHA and c = 4 read the value codes of 8 or 4
// tokens per 4-byte load, see scatter_words), during the next tile's score math (software pipelined). Each
// thread flushes its bins into fp32 accumulators (registers for R = 1, a global scratch for R > 1) when the mass added
// since the last flush could overflow 32 bits, and whenever the max grows (rescaling them). At the
// end the histogram is multiplied by the value centroids: one c-wide gather and FMA per token and group become one
// integer add. That product reads the value centroids from global memory (L2) against the bins, transposed in place as
// fp32 (see the epilogue), so the key tables stay loaded for the next item. Short items of the c = 8 GQA blocks (one
// tile of at most p.direct_max tokens) skip the histogram: each warp multiplies its tokens' p by their value centroids
// straight from the codes (direct_pv; the kv head's value table copied into the histograms' shared memory), since the
// histogram's fixed cost per item (clearing, flushing to the global scratch, the 256 x 16-bin product) dominated
// there. With R = 1 the shared addresses of the key
// gathers and the histogram atomics are built whole (table base in the PRMT constant, bin base in the lane's slot
// address), saving the window-base add of each access (H100: 3% at 8 x 32K); with R > 1 that made ptxas spill, and was
// slower, so those blocks add the base.
//
// Per-item work (what short items pay whatever their length): items are placed without integer divisions (FastDiv),
// the product's per-warp channel sums meet by a reduce-scatter (reduce_scatter), and the first flush and the empty
// m-tiles of a partial tile are skipped (kShort). The CQ-8c8b MHA block (8 warps) also has a LONG build without these,
// for items of at least p.long_min tokens: they move ptxas's schedule of its tile loop, and the LONG build keeps the
// schedule measured fastest at 8 x 32K (short-item build 0.8% slower there, 23% faster at 128 x 64; see launch_dt).
#include <type_traits>

#include "common.cuh"
#include "decode.cuh"
#include "kernels.h"

namespace cq {
namespace {

constexpr int kD = 128;
constexpr int kDelta = 64;         // tokens between two query columns (= the range of tau)
constexpr int kTile = 8 * kDelta;  // tokens per tile: 8 query columns
constexpr int kMStages = 3;
constexpr int kCodes = 256;
constexpr int kMinDirectSplit = 128;  // the shortest items that a direct split makes (p.direct_max >= this)
constexpr float kFix = 4194304.f;  // 2^22: p <= 1 and at most 1012 units of mass per bin between flushes
constexpr float kInvFix = 1.f / 4194304.f;
constexpr float kFlushMass = 500.f;  // flush before a tile when the mass since the last flush exceeds this
constexpr int kColReinit = 16;       // query-column rotation: exact sincos every 16 tiles, a recurrence between
constexpr int kBRow = 20 * 16;       // bytes per query column in shared memory (16 chunks + 4 of padding)
constexpr int kPBufStride = 68;      // words per warp: token 0 of each lane at 0.., token 1 at 36.. (bank skew)

// shared memory (bytes). The key tables start at dynamic offset kOffTab = 0xFC00: with the 1 KiB of shared memory
// the driver reserves per block (the dynamic window starts at shared address 0x400, checked by smem_window_ok), that
// is shared address 0x10000, so a key gather's whole shared address is one PRMT of its code byte into the constant
// (copy << 16 | slot << 4) with the table base in bits 16 and up: no address add per gather. Stages, reductions,
// p buffers (and the query columns where they fit) lie below the tables, the histograms (and columns) above.
constexpr int kTabCopy = kCodes * kD * 2;                  // one key table [code][128 channels]
constexpr int kOffTab8 = 0xFC00;                           // c = 8: key table copies at shared address 0x10000
constexpr uint32_t kSharedWindow = 0x400;                  // dynamic shared memory starts here (reserved 1 KiB)
static_assert(((kSharedWindow + kOffTab8) & 0xFFFFu) == 0, "key tables must start at a 64 KiB shared address");

// NW warps per block (8 or 16), R query heads per block (1; or 2, 3, 4 heads of a GQA group, with 8 warps). Warp w
// handles the tokens at tau = 8 (w % 8) + lane / 4 of each 64-token column group, and m-tiles (pairs of columns)
// kMT (w / 8) .. kMT (w / 8) + kMT - 1 of every tile: with 16 warps each warp has half the m-tiles of the 8-warp
// kernel and twice as many warps hide the latencies (measured slower on the H100: docs/RESULTS_kernels.md).
// KC channels per code group for keys and values: 8 (CQ-8c8b, 16 groups) or 4 (CQ-4c8b, 32 groups; 8 warps, 1 or 2
// query heads per block).
// With c = 4 a chunk of 8 channels is two groups: two 8-byte gathers of two codes instead of one 16-byte gather, then
// the same rotation and MMA; a warp's value atomics take the 32 groups of one token.
template <int NW, int R, int KC = 8>
struct Cfg {
  static_assert(NW == 8 || NW == 16, "8 or 16 warps");
  static_assert(R == 1 || (NW == 8 && R >= 2 && R <= 4), "query heads per block: 1, or 2 to 4 with 8 warps");
  static_assert(KC == 8 || (KC == 4 && NW == 8 && R <= 2), "c = 4: one or two query heads per block, 8 warps");
  static constexpr int kGroups = kD / KC;          // code groups per head (= code row bytes: 8-bit codes)
  static constexpr int kRB = kGroups;
  static constexpr int kVRows = kTile * kRB;                        // value rows follow the key rows in a stage
  static constexpr int kStageBytes = kVRows + kTile * kRB + 8 * 16;  // value rows skewed by 16 B per 64 tokens
  static constexpr int kNW = NW;
  static constexpr int kNT = NW * 32;
  static constexpr int kMT = 4 / (NW / 8);        // m-tiles per warp and tile
  static constexpr int kRR = kMT;                 // lanes r (= lane % 4) of a warp that hold scores
  static constexpr int kParts = 4 / kMT;          // scatter parts per m-tile
  // key table copies: two for c = 8 and R = 1 (the second with its halves swapped); c = 4 has no room for two
  static constexpr int kCopies = R == 1 && KC == 8 ? 2 : 1;
  static constexpr int kRep = R <= 2 && KC == 8 ? 2 : 1;  // histogram replicas
  static constexpr int kSlots = kGroups * kRep;           // histogram slots per code
  static constexpr int kBinsHead = kCodes * kSlots;
  // whole shared addresses for the key gathers and the histogram atomics (see the top of this file)
  static constexpr bool kWhole = R == 1;
  // c = 4 with two heads: the key rows in a ring of 2 stages, the value rows (scattered one tile later) in a ring of 3,
  // so that two histograms fit; otherwise a stage holds a tile's key rows and value rows, in a ring of kMStages
  static constexpr bool kSplit = KC == 4 && R > 1;
  static constexpr int kKStages = kSplit ? 2 : kMStages;
  static constexpr int kKStageBytes = kSplit ? kTile * kRB : kStageBytes;
  static constexpr int kVStageBytes = kSplit ? kVRows + 8 * 16 : kStageBytes;
  // R = 3, 4 (one replica): the value scatter pairs heads instead of tokens, so head j's histogram starts 16 banks
  // after head j - 1's (kHeadStride words apart)
  static constexpr bool kPair = KC == 8 && R >= 3;
  static constexpr int kHeadStride = kBinsHead + (kPair ? 16 : 0);
  static constexpr int kBinsPerThread = kBinsHead / kNT;   // per query head
  static constexpr int kColsPerThread = 8 * R * 64 / kNT;  // query columns written per thread
  static constexpr int kColStep = kNT / 64;                // between a thread's columns
  static constexpr int kNPer = 8 / kColStep;               // distinct column offsets n per thread
  static constexpr int kTokPerThread = kTile / kNT;        // tokens per thread in a stage load
  static constexpr int kStagesBytes =
      kSplit ? kKStages * kKStageBytes + kMStages * kVStageBytes : kMStages * kStageBytes;
  static constexpr int kRedBytes = 4 * NW * R * 4;
  static constexpr int kPBufBytes = R * NW * kPBufStride * 4;  // p of each warp's tokens, per query head
  static constexpr int kBBytes = 2 * 8 * R * kBRow;             // query columns [2][8 R][kBRow], double buffered
  static constexpr int kHistBytes = R * kHeadStride * 4;        // u32 [R][code][slots] (+ kHeadStride padding)
  // c = 8 GQA blocks: a direct item (one short tile, P.V straight from the codes) holds the head's value table
  // [code][128 channels] where the histograms would be, so the region is at least one table
  static constexpr bool kDirectTab = KC == 8 && R > 1;
  static constexpr int kHistRegion = kDirectTab && kHistBytes < kTabCopy ? kTabCopy : kHistBytes;
  // the key tables at shared address 0x10000 (c = 8) or 0x20000 (c = 4: twice the stages below them); stages,
  // reductions, p buffers and, where they fit, the columns below them. c = 4 with two heads: everything in sequence
  // (no whole addresses)
  static constexpr int kBelow = kStagesBytes + kRedBytes + kPBufBytes;
  static constexpr int kOffTab = KC == 8 ? kOffTab8 : R == 1 ? kOffTab8 + 0x10000 : kBelow + kBBytes;
  static constexpr bool kBBelow = kBelow + kBBytes <= kOffTab;
  static constexpr int kOffStage = 0;
  static constexpr int kOffRed = kStagesBytes;
  static constexpr int kOffPBuf = kOffRed + kRedBytes;
  static constexpr int kOffHist = kOffTab + kCopies * kTabCopy;
  static constexpr int kOffB = kBBelow ? kOffPBuf + kPBufBytes : kOffHist + kHistRegion;
  static constexpr int kSmem = kBBelow ? kOffHist + kHistRegion : kOffB + kBBytes;
  // a direct item's per-warp P.V sums [warp][head][channel] lie in the query columns' space (free after its tile)
  static_assert(!kDirectTab || NW * R * kD * 4 <= kBBytes, "direct P.V sums fit the query columns' space");
  static_assert(kOffPBuf + kPBufBytes + (kBBelow ? kBBytes : 0) <= kOffTab, "buffers below the key tables");
  static_assert(kOffTab % 16 == 0, "16-byte alignment");
  static_assert(kOffB % 16 == 0 && kOffPBuf % 16 == 0 && kOffHist % 16 == 0, "16-byte alignment");
  static_assert(kSmem <= 232448, "decode_mma shared memory exceeds the H100/H200 per-block limit");
  static_assert(kCodes % (kNT / kD) == 0 && kNT % kD == 0, "value product split");
  static_assert(kBinsHead % kNT == 0, "bins per thread");
};

// (lo, hi) <- (lo c - hi s, hi c + lo s) on two packed 16-bit pairs (RoPE on channels i and i + 64); ns = -s
// (bf16 HFMA2 cannot negate its addend, so the negation comes with the constant).
template <typename T>
__device__ __forceinline__ void rot2(uint32_t& lo, uint32_t& hi, uint32_t c, uint32_t s, uint32_t ns) {
  using V = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;
  const V l = *reinterpret_cast<const V*>(&lo), u = *reinterpret_cast<const V*>(&hi);
  const V cc = *reinterpret_cast<const V*>(&c), ss = *reinterpret_cast<const V*>(&s);
  const V nss = *reinterpret_cast<const V*>(&ns);
  const V nl = __hfma2(u, nss, __hmul2(l, cc));
  const V nu = __hfma2(l, ss, __hmul2(u, cc));
  lo = *reinterpret_cast<const uint32_t*>(&nl);
  hi = *reinterpret_cast<const uint32_t*>(&nu);
}

// cos, sin and -sin of one angle for a thread's 16 frequencies, packed as its key words are: [a][e] for channels
// 8(4a + r) + 2e + {0, 1} (a = 0, 1; their partners + 64 are chunks a + 2)
struct RopeK {
  uint32_t c[2][4], s[2][4], ns[2][4];
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ uint32_t word(const uint2& v, int i) { return i == 0 ? v.x : v.y; }

// RoPE constants of angle * f for the 8 frequencies of chunk a (channels 8(4a + r) + 2e + {0, 1}), word e at
// position e ^ eswap: eswap = 2 for the c = 4 rows that hold a chunk's words 2, 3 before 0, 1 (gather).
template <typename T>
__device__ __forceinline__ void rope_consts_a(const float* inv_freq, int r, int a, float angle, uint32_t (&c)[4],
                                              uint32_t (&s)[4], uint32_t (&ns)[4], int eswap = 0) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int i0 = 8 * (4 * a + r) + 2 * (e ^ eswap);
    float s0, c0, s1, c1;
    sincosf(angle * __ldg(inv_freq + i0), &s0, &c0);
    sincosf(angle * __ldg(inv_freq + i0 + 1), &s1, &c1);
    c[e] = pack2<T>(c0, c1);
    s[e] = pack2<T>(s0, s1);
    ns[e] = pack2<T>(-s0, -s1);
  }
}

template <typename T>
__device__ __forceinline__ void rope_consts(const float* inv_freq, int r, float angle, RopeK& k, int eswap = 0) {
#pragma unroll
  for (int a = 0; a < 2; ++a) rope_consts_a<T>(inv_freq, r, a, angle, k.c[a], k.s[a], k.ns[a], eswap);
}

// Rotate chunk pair (a, a + 2) of one of the m-tile's two keys (Y = 0: key x, row lane/4; Y = 1: key y, row
// lane/4 + 8; lo = chunk a, hi = chunk a + 2) and write it straight into mma A fragments: fr[lh][hh] = {x word 2hh,
// y word 2hh, x word 2hh+1, y word 2hh+1} of chunk a + 2 lh, so that each HMMA reads four consecutive registers.
template <typename T, int Y>
__device__ __forceinline__ void rotate_key(const uint4& lo, const uint4& hi, const uint32_t (&c)[4],
                                           const uint32_t (&s)[4], const uint32_t (&ns)[4], uint32_t (&fr)[2][2][4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    uint32_t l = word(lo, e), u = word(hi, e);
    rot2<T>(l, u, c[e], s[e], ns[e]);
    const int hh = e >> 1, xs = (e & 1) * 2 + Y;
    fr[0][hh][xs] = l;
    fr[1][hh][xs] = u;
  }
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ void pair_mma(float (&d0)[4], float (&d1)[4], const uint32_t (&fr)[2][2][4], const uint4& blo,
                                         const uint4& bhi) {
  mma16816<T>(d0, fr[0][0][0], fr[0][0][1], fr[0][0][2], fr[0][0][3], blo.x, blo.y);
  mma16816<T>(d1, fr[0][1][0], fr[0][1][1], fr[0][1][2], fr[0][1][3], blo.z, blo.w);
  mma16816<T>(d0, fr[1][0][0], fr[1][0][1], fr[1][0][2], fr[1][0][3], bhi.x, bhi.y);
  mma16816<T>(d1, fr[1][1][0], fr[1][1][1], fr[1][1][2], fr[1][1][3], bhi.z, bhi.w);
}

// The same for chunks whose words 2, 3 come first (c = 4, rows of odd g): B words 2, 3 with the first k-step.
template <typename T>
__device__ __forceinline__ void pair_mma_swapped(float (&d0)[4], float (&d1)[4], const uint32_t (&fr)[2][2][4],
                                                 const uint4& blo, const uint4& bhi) {
  mma16816<T>(d0, fr[0][0][0], fr[0][0][1], fr[0][0][2], fr[0][0][3], blo.z, blo.w);
  mma16816<T>(d1, fr[0][1][0], fr[0][1][1], fr[0][1][2], fr[0][1][3], blo.x, blo.y);
  mma16816<T>(d0, fr[1][0][0], fr[1][0][1], fr[1][0][2], fr[1][0][3], bhi.z, bhi.w);
  mma16816<T>(d1, fr[1][1][0], fr[1][1][1], fr[1][1][2], fr[1][1][3], bhi.x, bhi.y);
}

// Gather constants of a lane: the PRMT selector (byte r of a code word into byte 1) and, per chunk slot a, the
// table copy (row parity of the quad) and the 16-byte slot of chunk 4a + r in it (copy 1 holds chunk gamma at
// slot gamma ^ 4).
__device__ __forceinline__ uint32_t gather_sel(int r) { return 0x7604u | (static_cast<uint32_t>(r) << 4); }
__device__ __forceinline__ uint32_t gather_off(int g, int r, int a, int copies = 2) {
  const uint32_t odd = copies == 2 ? static_cast<uint32_t>(g & 1) : 0u;
  return (odd << 16) | ((static_cast<uint32_t>(4 * a + r) ^ (odd << 2)) << 4);
}

// c = 4: a lane's code word a holds the codes of its chunk 4a + r (groups 2 (4a + r) + e, e = 0, 1) in bytes
// 2 (r & 1) + e (see load_stage). The selector puts byte e of them into byte 1; the offset of group 2 gamma + e in a
// code's 256-byte table row is 16 gamma + 8 e. Two 8-byte gathers make the chunk's 8 channels. The four keys (rows g)
// of a half-warp read the same group of one table: rows of odd g fetch group e = 1 first, so that each 8-byte gather
// instruction meets a 2-way bank conflict instead of a 4-way one. Their chunks then hold words 2, 3 before 0, 1: their
// RoPE constants come in the same order (rope_consts_a, eswap = 2) and their scores from an MMA chain that takes the
// query's B words in that order too (pair_mma_swapped), so no register is moved.
__device__ __forceinline__ uint32_t gather_sel4(int r, int e) {
  return 0x7604u | (static_cast<uint32_t>(2 * (r & 1) + e) << 4);
}
// lane constants of chunk 4a + r: offsets (first, second) and selectors (first, second) of its two groups
__device__ __forceinline__ void gather4_consts(int g, int r, int a, uint32_t& off_a, uint32_t& off_b, uint32_t& sel_a,
                                               uint32_t& sel_b) {
  const uint32_t odd = static_cast<uint32_t>(g & 1), base = static_cast<uint32_t>(4 * a + r) << 4;
  off_a = base | (odd << 3);
  off_b = base | ((odd ^ 1u) << 3);
  sel_a = gather_sel4(r, static_cast<int>(odd));
  sel_b = gather_sel4(r, static_cast<int>(odd ^ 1u));
}
// Shared-memory accesses at whole 32-bit shared addresses (no window base to add).
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
// The chunk's two 8-byte gathers. kWhole: off_a, off_b hold whole shared addresses (the table base included; tab is
// not read); else offsets from tab.
template <bool kWhole = false>
__device__ __forceinline__ uint4 gather4(const uint8_t* tab, uint32_t kw, uint32_t off_a, uint32_t off_b,
                                         uint32_t sel_a, uint32_t sel_b) {
  uint2 u, v;
  if constexpr (kWhole) {
    u = lds64(__byte_perm(kw, off_a, sel_a));
    v = lds64(__byte_perm(kw, off_b, sel_b));
  } else {
    u = *reinterpret_cast<const uint2*>(tab + __byte_perm(kw, off_a, sel_a));
    v = *reinterpret_cast<const uint2*>(tab + __byte_perm(kw, off_b, sel_b));
  }
  return make_uint4(u.x, u.y, v.x, v.y);
}
__device__ __forceinline__ void red_add(uint32_t addr, uint32_t v) {
  asm volatile("red.shared.add.u32 [%0], %1;\n" ::"r"(addr), "r"(v));
}

// Scores of an m-tile whose keys are not at consecutive positions: each key rotated at its own offset px / py
// from its column. Out of line, so that its sincosf calls do not raise the register pressure of the regular loop.
template <typename T, int KC>
__device__ __noinline__ float2 irregular_mtile(const uint8_t* tab, const uint8_t* bcol, uint4 cx, uint4 cy, int lane,
                                               float px, float py, const float* inv_freq, int copies) {
  const int g = lane >> 2, r = lane & 3;
  const uint32_t sel = gather_sel(r);
  const int eswap = KC == 4 && (g & 1) ? 2 : 0;  // c = 4, odd g: chunk words 2, 3 first (see gather4_consts)
  float d0[4] = {0.f, 0.f, 0.f, 0.f}, d1[4] = {0.f, 0.f, 0.f, 0.f}, ds0[4] = {}, ds1[4] = {};
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    uint4 xlo, xhi, ylo, yhi;
    if constexpr (KC == 8) {
      const uint32_t lo = gather_off(g, r, a, copies), hi = gather_off(g, r, a + 2, copies);
      xlo = *reinterpret_cast<const uint4*>(tab + __byte_perm(word(cx, a), lo, sel));
      xhi = *reinterpret_cast<const uint4*>(tab + __byte_perm(word(cx, a + 2), hi, sel));
      ylo = *reinterpret_cast<const uint4*>(tab + __byte_perm(word(cy, a), lo, sel));
      yhi = *reinterpret_cast<const uint4*>(tab + __byte_perm(word(cy, a + 2), hi, sel));
    } else {
      uint32_t la, lb, lsa, lsb, ha, hb, hsa, hsb;
      gather4_consts(g, r, a, la, lb, lsa, lsb);
      gather4_consts(g, r, a + 2, ha, hb, hsa, hsb);
      xlo = gather4(tab, word(cx, a), la, lb, lsa, lsb);
      xhi = gather4(tab, word(cx, a + 2), ha, hb, hsa, hsb);
      ylo = gather4(tab, word(cy, a), la, lb, lsa, lsb);
      yhi = gather4(tab, word(cy, a + 2), ha, hb, hsa, hsb);
    }
    uint32_t fr[2][2][4], c[4], sn[4], ns[4];
    rope_consts_a<T>(inv_freq, r, a, px, c, sn, ns, eswap);
    rotate_key<T, 0>(xlo, xhi, c, sn, ns, fr);
    rope_consts_a<T>(inv_freq, r, a, py, c, sn, ns, eswap);
    rotate_key<T, 1>(ylo, yhi, c, sn, ns, fr);
    const uint4 blo = *reinterpret_cast<const uint4*>(bcol + a * 64);
    const uint4 bhi = *reinterpret_cast<const uint4*>(bcol + (a + 2) * 64);
    pair_mma<T>(d0, d1, fr, blo, bhi);
    if constexpr (KC == 4) pair_mma_swapped<T>(ds0, ds1, fr, blo, bhi);
  }
  if (eswap) return make_float2(ds0[0] + ds1[0], ds0[3] + ds1[3]);
  return make_float2(d0[0] + d1[0], d0[3] + d1[3]);
}

// Sums of N values (a power of two up to 32) over the 32 lanes of a warp, scattered: at each step a lane keeps half
// of the values it still holds (the upper half where its lane bit `off` is set) and adds its partner's copy of that
// half, so 16 values take 8 + 4 + 2 + 1 exchanges and a last add instead of 16 x 5 butterflies. Returns the sum of
// value lane / (32 / N) (every lane of that run of 32 / N lanes holds it).
template <int N>
__device__ __forceinline__ float reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "a power of two up to 32");
#pragma unroll
  for (int off = 16, h = N; off >= 1; off >>= 1) {
    if (h > 1) {
      h >>= 1;
      const bool up = (lane & off) != 0;
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        if (i < h) {
          const float send = up ? v[i] : v[i + h], keep = up ? v[i + h] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
      }
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
    }
  }
  return v[0];
}

// P.V of a short item straight from its value codes (the direct path of the GQA blocks; see the kernel's end of an
// item): warp `warp` takes the tokens whose p it holds, written in the scatter's layout (head j's p of token
// (2 v + th) 64 + 8 wt + g at pbw[j NW kPBufStride + 36 th + 4 g + v], v = kMT wh + vv), from the value code rows sv of
// the item's only tile, a lane per value group, the two half-warps a token each: one 16-byte centroid load per token
// and group from the head's value table vtab ([code][16 groups] of 16 bytes, in shared memory: a quarter-warp's eight
// groups fall on 32 distinct banks), then 8 FMAs per token, group and head. Its sums go to part[warp][j][channel].
// Lane and warp are read again here (volatile), so that the per-lane constants are not hoisted out of the item loop
// into the main loop's registers (they made it spill; out of line, the call did).
__device__ __forceinline__ int volatile_tid() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
  return t;
}
template <typename T, int NW, int R>
__device__ __forceinline__ void direct_pv(const uint8_t* sv, const uint4* vtab, const uint32_t* pbw, int n,
                                          float* part) {
  const int tid = volatile_tid(), lane = tid & 31, warp = tid >> 5;
  using C = Cfg<NW, R, 8>;
  constexpr int kMT = C::kMT, kRB = C::kRB, kGroups = C::kGroups;
  static_assert(kGroups == 16, "c = 8: a half-warp per token");
  const int wt = warp & 7, wh = warp >> 3, gam = lane & 15, half = lane >> 4;
  float od[R][8] = {};
  // slot q = 16 vv + 8 th + g of this warp holds token (2 v + th) 64 + 8 wt + g (v = kMT wh + vv); lane half h takes
  // q = k0 + 2 u + h, in rounds of 4 loads per lane
#pragma unroll
  for (int k0 = 0; k0 < kMT * 16; k0 += 8) {
    const int v = kMT * wh + (k0 >> 4), th = (k0 >> 3) & 1, t0 = (2 * v + th) * kDelta + 8 * wt;
    if (t0 >= n) continue;  // no token of the round in the item (warp-uniform)
    uint4 cv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {  // the round's loads issued before the first use
      const int t = t0 + 2 * u + half;
      cv[u] = make_uint4(0u, 0u, 0u, 0u);
      if (t < n) cv[u] = vtab[sv[t * kRB + (t / kDelta) * 16 + gam] * kGroups + gam];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int g = 2 * u + half;
      float pu[R];
#pragma unroll
      for (int j = 0; j < R; ++j)
        pu[j] = t0 + g < n ? static_cast<float>(pbw[j * NW * kPBufStride + 36 * th + 4 * g + v]) * kInvFix : 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = unpack2<T>(word(cv[u], e));
#pragma unroll
        for (int j = 0; j < R; ++j) {
          od[j][2 * e] = fmaf(pu[j], f.x, od[j][2 * e]);
          od[j][2 * e + 1] = fmaf(pu[j], f.y, od[j][2 * e + 1]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) od[j][e] += __shfl_xor_sync(0xffffffffu, od[j][e], 16);
  if (lane < 16) {
#pragma unroll
    for (int j = 0; j < R; ++j)
#pragma unroll
      for (int e = 0; e < 8; e += 4)
        *reinterpret_cast<float4*>(part + (warp * R + j) * kD + 8 * gam + e) =
            make_float4(od[j][e], od[j][e + 1], od[j][e + 2], od[j][e + 3]);
  }
}

// k-slot mapping (the same for A and B): mma chunk 2a + hh, slots 2r, 2r+1 hold word 2hh and slots 2r+8, 2r+9 word
// 2hh + 1 of the thread's chunk a (channels 8(4a + r) ..). The scores of the m-tile's keys x (row lane/4) and y
// (row lane/4 + 8) against the query columns are d0[0] + d1[0] (column 2r) and d0[3] + d1[3] (column 2r + 1).

template <typename T, int NW, int R, int KC, bool LONG>
__global__ void __launch_bounds__(NW * 32, 1) decode_mma_kernel(const AttnParams p) {
  using C = Cfg<NW, R, KC>;
  constexpr int kNW = C::kNW, kNT = C::kNT, kMT = C::kMT, kRR = C::kRR, kBinsPerThread = C::kBinsPerThread;
  constexpr int kSlots = C::kSlots, kRB = C::kRB, kVRows = C::kVRows, kStageBytes = C::kStageBytes;
  constexpr int kOffTab = C::kOffTab, kGroups = C::kGroups;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wt = warp & 7, wh = warp >> 3;  // tau group (tau = 8 wt + lane / 4) and m-tile half
  const int g = lane >> 2, r = lane & 3;
  const int nsplit = p.nsplit;          // partial rows per query head (code splits + the full-precision split)
  const int ncode = nsplit - p.has_fp;  // code splits: this kernel's
  // Work items (kv-head-major: head block hb of R query heads, batch row b, code split): item = (hb B + b) ncode +
  // split; a kv head has p.mma_nhb head blocks, block x taking query heads from min(R x, group - R) of its group:
  // when R does not divide the group, the last block overlaps the one before it (7 = 4 + 4 over heads 0-3 and 3-6;
  // 5 = 3 + 3 over 0-2 and 2-4), computes the shared heads again and writes only its own (skip). This block takes
  // the contiguous items [i_begin, i_end); consecutive items of one kv head reuse its key tables.
  // items fit an int: B * H_q / R rows (ncode > 1 only while the rows do not fill the SMs, so at most #SMs items then)
  const int rep = p.Hq / p.Hkv;
  const int64_t n_items = static_cast<int64_t>(p.Hkv) * p.mma_nhb * p.B * ncode;
  const int i_begin = static_cast<int>(n_items * blockIdx.x / gridDim.x);
  const int i_end = static_cast<int>(n_items * (blockIdx.x + 1) / gridDim.x);
  // R > 1: fp32 accumulators of the histograms in global memory, [R][bins], this block's own
  float* gacc = nullptr;
  if constexpr (R > 1) gacc = p.ws_hist + static_cast<int64_t>(blockIdx.x) * (R * C::kBinsHead);

  struct Item {
    int b, qh0, hk, split, t_begin, t_end, ntile, skip;
  };
  // Divisions by the launch's ncode, B and nhb go through FastDiv: the hardware has no integer divide, and its
  // sequence for a runtime divisor, twice per item, was ~19% of the warp instructions at 128 x 64 (MHA, Nsight
  // Compute). LONG (the CQ-8c8b MHA block for long items, see launch_dt) keeps the plain divisions, and so the schedule
  // of its tile loop that was measured fastest there.
  auto item_at = [&](int i) {
    Item it;
    int hb;  // head block: kv head hb / nhb, block x = hb % nhb of its group
    if constexpr (LONG) {
      it.split = i % ncode;
      it.b = (i / ncode) % p.B;
      hb = i / (ncode * p.B);
      it.hk = hb / p.mma_nhb;
    } else {
      const int rowi = fdiv(i, p.div_ncode);  // (head block, batch row)
      it.split = i - rowi * ncode;
      hb = fdiv(rowi, p.div_b);
      it.b = rowi - hb * p.B;
      it.hk = fdiv(hb, p.div_nhb);
    }
    const int first = R * (hb - it.hk * p.mma_nhb), h0 = min(first, rep - R);
    it.qh0 = it.hk * rep + h0;
    it.skip = first - h0;  // leading heads that the previous block of the group writes
    // this item's share of the query's allowed keys that are read through codes (Q == 1: range[b]; not the sinks and
    // not the window, as in attention.attend_codes_reference)
    const int code_hi = p.window > 0 ? max(0, query_start(p) - p.window + 1) : p.S;
    const int cmin = max(p.range[it.b * 2], p.n_sink), cmax = min(min(p.range[it.b * 2 + 1], p.S), code_hi);
    it.t_begin = it.t_end = 0;
    if (cmin < cmax) {
      const int per = LONG ? (cmax - cmin + ncode - 1) / ncode : fdiv(cmax - cmin + ncode - 1, p.div_ncode);
      it.t_begin = cmin + it.split * per;
      it.t_end = min(cmax, it.t_begin + per);
    }
    it.ntile = it.t_end > it.t_begin ? (it.t_end - it.t_begin + kTile - 1) / kTile : 0;
    return it;
  };
  auto head_row = [&](const Item& it) { return (static_cast<int64_t>(it.b) * p.Hkv + it.hk) * p.cap * kRB; };
  // the key rows in key stage ks, the value rows of value stage vs at vstage(vs) + kVRows (tile t of an item: ks =
  // t % C::kKStages, vs = t % kMStages; C::kSplit: two rings, else one stage holds both)
  auto kstage = [&](int ks) { return smem + C::kOffStage + ks * C::kKStageBytes; };
  auto vstage = [&](int vs) {
    return smem + C::kOffStage + (C::kSplit ? C::kKStages * C::kKStageBytes - kVRows : 0) + vs * C::kVStageBytes;
  };
  // stages (ks, vs) <- the code rows of tokens t0 .. min(t0 + kTile, t_end) of the rows at kc / vc
  auto load_stage = [&](int kslot, int vslot, const uint8_t* kc, const uint8_t* vc, int t0, int t_end) {
    const int n = min(kTile, t_end - t0);
    uint8_t* sp = kstage(kslot);
    uint8_t* sq = C::kSplit ? vstage(vslot) : sp;
    const uint8_t* ks = kc + static_cast<int64_t>(t0) * kRB;
    const uint8_t* vs = vc + static_cast<int64_t>(t0) * kRB;
    if constexpr (KC == 8) {
#pragma unroll
      for (int j = 0; j < C::kTokPerThread; ++j) {
        const int i = tid + j * kNT;
        if (i < n) {
          cp_async16(sp + i * kRB, ks + i * kRB);
          cp_async16(sq + kVRows + i * kRB + (i / kDelta) * 16, vs + i * kRB);
        }
      }
    } else {
      // key rows with their words permuted (word w at slot (w & 1) * 4 + w / 2): lane r's code words for chunks
      // 4a + r (a = 0..3: words 2a + r / 2) are then the 16 bytes at r / 2 * 16
#pragma unroll
      for (int j = 0; j < kTile * 8 / kNT; ++j) {
        const int i = (tid + j * kNT) >> 3, w = (tid + j * kNT) & 7;
        if (i < n) cp_async4(sp + i * kRB + ((w & 1) * 4 + (w >> 1)) * 4, ks + i * kRB + w * 4);
      }
#pragma unroll
      for (int j = 0; j < kTile * 2 / kNT; ++j) {
        const int i = (tid + j * kNT) >> 1, h = (tid + j * kNT) & 1;
        if (i < n) cp_async16(sq + kVRows + i * kRB + (i / kDelta) * 16 + h * 16, vs + i * kRB + h * 16);
      }
    }
  };
  // Asynchronous loads that start an item: the key table copies when the kv head changes (copy c holds chunk gamma,
  // channels 8 gamma .. 8 gamma + 7, at slot gamma ^ 4c) and the first kMStages - 1 stages, one commit group each.
  // Issued for the next item while the current one finishes (its last key gathers done, its stages free). In the c = 8
  // blocks of 2 or 3 query heads (kPre) also the next item's query elements (qn, into registers: the loop top
  // otherwise waits on them; 6% of the samples at MHA 128 x 64), and the item itself is kept (nxt) rather than placed
  // again at the loop top (whose loads of its key range also stalled). H100, kernel GPU time, GQA group 2: 128 x 64 -6%,
  // 64 x 2304 -3%, 8 x 32K -1%. Not elsewhere: R = 4 spilled (the query alone there: -1.8% to +1.3%), and in the MHA
  // blocks (c = 8 short-item build and c = 4) the loop's schedule moved (-5% at 128 x 64 and 512 x 512 but +1-2% at
  // 4K-8K tokens per item and at c = 4 8 x 32K).
  constexpr bool kPre = !LONG && KC == 8 && (R == 2 || R == 3);
  // P.V of short items straight from the codes (direct_pv), in the c = 8 GQA blocks only: in the others it was slower
  // than the histogram beyond 64 tokens (H100: CQ-8c8b MHA 128 x 256 0.224 -> 0.282 ms, CQ-4c8b 64 x 128 0.125 ->
  // 0.155; docs/RESULTS_kernels.md), and the MHA block's main loop then spilled (an inline version) or was scheduled
  // otherwise (8 x 32K 0.289 -> 0.295 ms), so they are built without it. A direct item (one tile of at most
  // p.direct_max tokens) reads its kv head's value table from shared memory, copied (from p.v_tab, code-major) into
  // the histograms' space, which it does not use; vtab_hk is the kv head whose table is there (-1: none).
  constexpr bool kDirect = C::kDirectTab;
  auto direct_item = [&](const Item& it) {
    return kDirect && it.ntile == 1 && it.t_end - it.t_begin <= p.direct_max;
  };
  int vtab_hk = -1;
  auto load_vtab = [&](int hk) {
    const T* vt = reinterpret_cast<const T*>(p.v_tab) + static_cast<int64_t>(hk) * kCodes * kD;
    for (int i = tid; i < kCodes * 16; i += kNT) cp_async16(smem + C::kOffHist + i * 16, vt + i * 8);
    vtab_hk = hk;
  };
  int cur_hk = -1;
  T qn[kPre ? 2 * R : 1];
  Item nxt;
  // vtab_ok: the histograms' space is free (not while the current item's epilogue still uses it)
  auto prologue = [&](const Item& it, bool vtab_ok = true) {
    if constexpr (kPre) {
      nxt = it;
      const int f = tid & 63;
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const T* qp = reinterpret_cast<const T*>(p.q) + it.b * p.q_sb + (it.qh0 + j) * p.q_sh;
        qn[2 * j] = qp[f];
        qn[2 * j + 1] = qp[f + 64];
      }
    }
    if (it.ntile > 0 && it.hk != cur_hk) {
      // a table copy is the head's code-major rows (p.k_tab: code * 256 bytes + channel * 2, c = 4 and 8 alike), the
      // second copy (c = 8, R = 1) with the 128-byte halves of each row swapped (slot s holds chunk s ^ 4): linear
      // 16-byte pieces, coalesced and free of shared-memory write conflicts
      const T* ktab = reinterpret_cast<const T*>(p.k_tab) + static_cast<int64_t>(it.hk) * kCodes * kD;
      for (int i = tid; i < C::kCopies * kCodes * 16; i += kNT) {
        const int copy = i >> 12, code = (i >> 4) & (kCodes - 1), slot = i & 15;
        cp_async16(smem + kOffTab + copy * kTabCopy + code * 256 + slot * 16,
                   ktab + code * kD + (slot ^ (copy << 2)) * 8);
      }
      cur_hk = it.hk;
    }
    if (kDirect && vtab_ok && direct_item(it) && it.hk != vtab_hk) load_vtab(it.hk);  // in the first stage's group
    const int64_t row = head_row(it);
#pragma unroll
    for (int s = 0; s < kMStages - 1; ++s) {
      if (s < it.ntile) load_stage(s, s, p.k_codes + row, p.v_codes + row, it.t_begin + s * kTile, it.t_end);
      cp_async_commit();
    }
  };
  // c = 8: the first item's loads go out before the per-thread constants below are computed (their global loads and
  // sincosf took ~3 us of a short item's block on the H100, now overlapped with the table and first stages). c = 4
  // issues them after the constants: earlier, its tile loop's schedule ran ~1% slower on long items
  constexpr bool kEarly = KC == 8;
  if (kEarly && i_begin < i_end) prologue(item_at(i_begin));

  // Work saved on short items (a partial tile's empty m-tiles, the first flush, the last flush's clearing): 14% at
  // 128 x 64 and 512 x 128, but the CQ-8c8b MHA block then ran 3% slower at 8 x 32K (another schedule of its full
  // tiles), so that block has a LONG build without it for long items, and the 16-warp one has none
  // (docs/RESULTS_kernels.md).
  constexpr bool kShort = !(KC == 8 && R == 1 && (LONG || NW == 16));
  // ---- per-thread constants of the key gathers and rotations
  uint32_t sel = gather_sel(r), sel1 = 0u;
  // shared address of the key tables: its low 16 bits are zero (kOffTab), so PRMT can put a code into bits 8-15
  constexpr bool kWhole = C::kWhole;  // whole shared addresses (see the top of this file)
  const uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t tabs = sbase + kOffTab;
  if (kWhole && (tabs & 0xFFFFu) != 0u) __trap();  // launches check the window (smem_window_ok): never silently wrong
  // (table base +) copy << 16 | slot << 4 of chunk 4a + r; c = 4: its two groups' offsets (loff[a], loff[4 + a])
  uint32_t loff[KC == 8 ? 4 : 8];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    if constexpr (KC == 8) {
      loff[a] = (kWhole ? tabs : 0u) + gather_off(g, r, a, C::kCopies);
    } else {
      gather4_consts(g, r, a, loff[a], loff[4 + a], sel, sel1);  // sel, sel1: the same for every a
      if (kWhole) {  // whole addresses: the table's shared address has its low 16 bits zero
        loff[a] += tabs;
        loff[4 + a] += tabs;
      }
    }
  }
  auto gather = [&](uint32_t code_word, int a) {  // 8 key channels of chunk 4a + r, by the code byte r of code_word
    if constexpr (KC == 4) {
      // rows of odd g: group 2 gamma + 1 (words 2, 3 of the chunk) in u, words 0, 1 in v; their MMA takes the B words
      // in the same order (pair_mma_swapped), so no register moves
      return gather4<kWhole>(smem + kOffTab, code_word, loff[a], loff[4 + a], sel, sel1);
    } else {
      const uint32_t at = __byte_perm(code_word, loff[a], sel);
      if constexpr (kWhole) return lds128(at);
      else return *reinterpret_cast<const uint4*>(smem + kOffTab + at);
    }
  };
  RopeK rk;  // R(tau), tau = 8 wt + g: fixed for all of this thread's keys (c = 4, odd g: words 2, 3 first, see gather)
  rope_consts<T>(p.inv_freq, r, static_cast<float>(8 * wt + g), rk, KC == 4 && (g & 1) ? 2 : 0);

  // ---- query columns [buf][8 j + n]: this thread writes frequency fi of columns col0 + k kColStep (n, head j)
  const int fi = tid & 63, col0 = tid >> 6;
  const float qscale = p.scaling * kLog2e * p.rope_scale;
  const float ff = __ldg(p.inv_freq + fi);
  float rcc[C::kNPer], rss[C::kNPer], stc, sts;
#pragma unroll
  for (int k = 0; k < C::kNPer; ++k)
    sincosf(static_cast<float>(kDelta * (col0 + k * C::kColStep)) * ff, &rss[k], &rcc[k]);
  sincosf(static_cast<float>(kTile) * ff, &sts, &stc);
  float qa[R], qb[R];
  float ec = 1.f, es = 0.f;
  int64_t pcur = 0;
  int nrec = kColReinit;
  auto columns = [&](int64_t P, int buf) {
    if (nrec < kColReinit && P == pcur + kTile) {
      const float c = ec * stc - es * sts;
      es = ec * sts + es * stc;
      ec = c;
      ++nrec;
    } else {
      sincosf(static_cast<float>(P) * ff, &es, &ec);
      nrec = 0;
    }
    pcur = P;
    uint8_t* bs = smem + C::kOffB + buf * 8 * R * kBRow;
#pragma unroll
    for (int k = 0; k < C::kColsPerThread; ++k) {
      const int col = col0 + k * C::kColStep, kn = k % C::kNPer, j = col >> 3;
      const float c = ec * rcc[kn] - es * rss[kn], s = ec * rss[kn] + es * rcc[kn];
      T* row = reinterpret_cast<T*>(bs + col * kBRow);
      row[fi] = from_f<T>(qa[j] * c + qb[j] * s);
      row[fi + 64] = from_f<T>(qb[j] * c - qa[j] * s);
    }
  };

  // accumulators of the histogram bins this thread owns (bin tid + kNT k of each head)
  float acc[R == 1 ? kBinsPerThread : 1];
  float m_ref[R], mass_acc[R];
  // the sum of p and the last tile's mass of this lane's tokens, for its query head (R == 1: head 0; R > 1: head r, or
  // none for r >= R)
  float l_r = 0.f, ptile_r = 0.f;
  uint32_t* hist = reinterpret_cast<uint32_t*>(smem + C::kOffHist);
  float* red = reinterpret_cast<float*>(smem + C::kOffRed);
  // bins -> fp32 accumulators (times scale); zero: clear the bins for more atomics (not after the last scatter: the
  // epilogue overwrites them and the next item clears them)
  auto flush = [&](int j, float scale, bool zero = true) {
#pragma unroll
    for (int k = 0; k < kBinsPerThread; ++k) {
      const int hidx = j * C::kHeadStride + tid + kNT * k, idx = j * C::kBinsHead + tid + kNT * k;
      const uint32_t v = hist[hidx];
      if (zero) hist[hidx] = 0u;
      if constexpr (R == 1) acc[k] = fmaf(static_cast<float>(v), kInvFix, acc[k]) * scale;
      else gacc[idx] = fmaf(static_cast<float>(v), kInvFix, gacc[idx]) * scale;
    }
  };
  // this warp's share of each head's sum of p (l_r summed over the lanes of one head) -> dst[j kNW + warp]
  auto l_share = [&](float* dst) {
    float lw = l_r;
    if constexpr (R == 1) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) lw += __shfl_xor_sync(0xffffffffu, lw, off);
      if (lane == 0) dst[warp] = lw;
    } else {  // lane r holds head r's
#pragma unroll
      for (int off = 16; off >= 4; off >>= 1) lw += __shfl_xor_sync(0xffffffffu, lw, off);
      if (lane < R) dst[lane * kNW + warp] = lw;
    }
  };
  // value scatter: lanes 0-15 take token 0 of lane k, lanes 16-31 token 1 (64 tokens further); slot = group (+ 16
  // replica with two replicas)
  const int half = lane >> 4;
  const int vlane = kVRows + (8 * wt + half * kDelta) * kRB + half * 16 + (lane & 15);
  // this lane's histogram slot: its whole shared address (R == 1), or its byte offset in a head's histogram
  const uint32_t slot4 = (kWhole ? sbase + C::kOffHist : 0u) + (lane & (kSlots - 1)) * 4;
  uint32_t* pbw = reinterpret_cast<uint32_t*>(smem + C::kOffPBuf) + warp * kPBufStride;  // head j at + j kNW stride
  const int o0 = 2 * r * kDelta + 8 * wt + g;  // tile offsets of this lane's two scores: o0, o0 + kDelta

  // Value scatter of the previous tile (p in pbw, value codes still in its stage), a part per m-tile so that the
  // atomics interleave with the score math. Lanes 0-15 take token 0 of lane k, lanes 16-31 its token 1.
  // Part `part` (0..3) takes the tokens of lanes 8 part .. 8 part + 7 whose r holds scores in this warp.
  // R = 4: lanes 0-15 add head 2i's p and lanes 16-31 head 2i + 1's for the same token (group lane & 15); with the
  // heads' histograms 16 banks apart a warp's 32 atomics hit 32 banks (pairing two tokens, as below, puts two codes
  // of one group on the same bank whenever their parities agree). R = 3: heads 0 | 1 of each token, then head 2 of
  // the two tokens (lanes 0-15 | 16-31) as before.
  uint8_t* const hpair = smem + C::kOffHist + (half * C::kHeadStride + (lane & 15)) * 4;
  auto scatter_pairs = [&](const uint8_t* sv, int part) {
#pragma unroll
    for (int k4 = 2 * part; k4 < 2 * part + 2; ++k4) {
      if constexpr (R == 3) {
        uint32_t code[2][4];
#pragma unroll
        for (int th = 0; th < 2; ++th) {
          const uint8_t* vt = sv + kVRows + (8 * wt + th * kDelta) * kRB + th * 16 + (lane & 15);
#pragma unroll
          for (int rr = 0; rr < 4; ++rr) code[th][rr] = vt[(2 * rr * kDelta + k4) * kRB + 2 * rr * 16] * (kSlots * 4);
        }
#pragma unroll
        for (int th = 0; th < 2; ++th) {
          const uint4 w = *reinterpret_cast<const uint4*>(pbw + half * kNW * kPBufStride + 36 * th + 4 * k4);
          atomicAdd(reinterpret_cast<unsigned*>(hpair + code[th][0]), w.x);
          atomicAdd(reinterpret_cast<unsigned*>(hpair + code[th][1]), w.y);
          atomicAdd(reinterpret_cast<unsigned*>(hpair + code[th][2]), w.z);
          atomicAdd(reinterpret_cast<unsigned*>(hpair + code[th][3]), w.w);
        }
        const uint4 w = *reinterpret_cast<const uint4*>(pbw + 2 * kNW * kPBufStride + 36 * half + 4 * k4);
        uint8_t* h2 = smem + C::kOffHist + (2 * C::kHeadStride + (lane & 15)) * 4;
        atomicAdd(reinterpret_cast<unsigned*>(h2 + (half ? code[1][0] : code[0][0])), w.x);
        atomicAdd(reinterpret_cast<unsigned*>(h2 + (half ? code[1][1] : code[0][1])), w.y);
        atomicAdd(reinterpret_cast<unsigned*>(h2 + (half ? code[1][2] : code[0][2])), w.z);
        atomicAdd(reinterpret_cast<unsigned*>(h2 + (half ? code[1][3] : code[0][3])), w.w);
      } else {
#pragma unroll
        for (int th = 0; th < 2; ++th) {
          const uint8_t* vt = sv + kVRows + (8 * wt + th * kDelta) * kRB + th * 16 + (lane & 15);
          uint32_t code[4];
#pragma unroll
          for (int rr = 0; rr < 4; ++rr) code[rr] = vt[(2 * rr * kDelta + k4) * kRB + 2 * rr * 16] * (kSlots * 4);
#pragma unroll
          for (int i = 0; i < R / 2; ++i) {
            const uint32_t* pr = pbw + (2 * i + half) * kNW * kPBufStride + 36 * th;
            const uint4 w = *reinterpret_cast<const uint4*>(pr + 4 * k4);
            uint8_t* hb = hpair + i * 2 * C::kHeadStride * 4;
            atomicAdd(reinterpret_cast<unsigned*>(hb + code[0]), w.x);
            atomicAdd(reinterpret_cast<unsigned*>(hb + code[1]), w.y);
            atomicAdd(reinterpret_cast<unsigned*>(hb + code[2]), w.z);
            atomicAdd(reinterpret_cast<unsigned*>(hb + code[3]), w.w);
          }
        }
      }
    }
  };
  // Value scatter from whole code words (c = 4, and c = 8 MHA): one 4-byte load gives the warp the value code rows of
  // kTPL tokens, lane l word w = l % kW of token q = l / kW (the rows on distinct banks); its atomic j then adds token
  // q's p to the bin of group 4 w + (j + q) % 4 (byte (j + q) % 4 of the word: byte j after rotating it by q bytes)
  // in histogram replica q / 4 (c = 8: two replicas), so a warp's atomics hit 32 banks. Token q is m-tile mt's token
  // 2 mt * 64 + 8 wt + k4 + 64 th: c = 8 (8 tokens per load) mt = q / 2, th = q % 2; c = 4 (4 tokens per load, two
  // loads per k4) mt = q, th = 0, 1.
  constexpr bool kWords = KC == 4 || (R == 1 && NW == 8);
  constexpr int kW = kRB / 4, kTPL = 32 / kW, kLoads = kTPL == 8 ? 1 : 2;
  const int qw = lane / kW, mtw = kTPL == 8 ? qw >> 1 : qw, thw = kTPL == 8 ? qw & 1 : 0;
  const uint8_t* const vwrd = smem + kVRows + 8 * wt * kRB + mtw * 2 * (kDelta * kRB + 16) +
                             thw * (kDelta * kRB + 16) + (lane % kW) * 4;
  uint32_t hsl[4];  // whole shared address of this lane's slot in code 0's histogram row, per atomic j
#pragma unroll
  for (int j = 0; j < 4; ++j)
    hsl[j] = sbase + C::kOffHist + (4 * (lane % kW) + ((j + qw) & 3) + (C::kRep == 2 ? 16 * (qw >> 2) : 0)) * 4;
  auto scatter_words = [&](const uint8_t* sv, int part) {
    const uint8_t* vb = sv + (vwrd - smem);
#pragma unroll
    for (int k4 = 2 * part; k4 < 2 * part + 2; ++k4) {
#pragma unroll
      for (int th = 0; th < kLoads; ++th) {
        const uint32_t raw = *reinterpret_cast<const uint32_t*>(vb + k4 * kRB + th * (kDelta * kRB + 16));
        const uint32_t wv = __funnelshift_r(raw, raw, 8 * (qw & 3));
        uint32_t pv[R];  // head jj's p (R > 1: lane r held head r's scores, written in the same layout)
#pragma unroll
        for (int jj = 0; jj < R; ++jj) pv[jj] = pbw[jj * kNW * kPBufStride + 36 * (thw + th) + 4 * k4 + mtw];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t code = __byte_perm(wv, 0u, 0x4440u | j) * (kSlots * 4) + hsl[j];
#pragma unroll
          for (int jj = 0; jj < R; ++jj) red_add(code + jj * C::kHeadStride * 4, pv[jj]);
        }
      }
    }
  };
  auto scatter = [&](const uint8_t* sv, int part) {
    if constexpr (kWords) {
      scatter_words(sv, part);
      return;
    }
    if constexpr (C::kPair) {
      scatter_pairs(sv, part);
      return;
    }
    const uint8_t* vs = sv + vlane;
#pragma unroll
    for (int k4 = 2 * part; k4 < 2 * part + 2; ++k4) {
      // bin addresses (whole, or in a head's histogram) of lane 4 k4 + rr's tokens: 2 rr * 64 + 8 wt + k4 (+ 64),
      // rr = kRR wh + jj
      uint32_t code[kRR];
#pragma unroll
      for (int jj = 0; jj < kRR; ++jj) {
        const int rr = kRR * wh + jj;
        code[jj] = vs[(2 * rr * kDelta + k4) * kRB + 2 * rr * 16] * (kSlots * 4) + slot4;
      }
#pragma unroll
      for (int j = 0; j < R; ++j) {  // one head's p values at a time
        const uint32_t* pr = pbw + j * kNW * kPBufStride + 36 * half;
        uint32_t pk[kRR];
        if constexpr (kRR == 4) {
          const uint4 w = *reinterpret_cast<const uint4*>(pr + 4 * k4);
          pk[0] = w.x; pk[1] = w.y; pk[2] = w.z; pk[3] = w.w;
        } else {
          const uint2 w = *reinterpret_cast<const uint2*>(pr + 4 * k4 + kRR * wh);
          pk[0] = w.x; pk[1] = w.y;
        }
        if constexpr (kWhole) {
#pragma unroll
          for (int jj = 0; jj < kRR; ++jj) red_add(code[jj], pk[jj]);
        } else {
          uint8_t* hj = smem + C::kOffHist + j * C::kHeadStride * 4;
#pragma unroll
          for (int jj = 0; jj < kRR; ++jj) atomicAdd(reinterpret_cast<unsigned*>(hj + code[jj]), pk[jj]);
        }
      }
    }
  };

  if (!kEarly && i_begin < i_end) prologue(item_at(i_begin));
  for (int item = i_begin; item < i_end; ++item) {
    const Item cur = kPre ? nxt : item_at(item);
    const int b = cur.b, qh0 = cur.qh0, split = cur.split, t_begin = cur.t_begin, t_end = cur.t_end;
    const int ntile = cur.ntile;
    auto row_out = [&](int j) { return (static_cast<int64_t>(b) * p.Hq + qh0 + j) * nsplit + split; };
    auto out_ptr = [&](int j) { return reinterpret_cast<T*>(p.out) + b * p.o_sb + (qh0 + j) * p.o_sh; };
    // channel d of head j: the output o / L, or this split's partial (o; m and L once per row) for the combine
    auto store = [&](int j, int d, float o, float L) {
      if (nsplit == 1) {
        out_ptr(j)[d] = from_f<T>(L > 0.f ? o / L : 0.f);
      } else {
        p.ws_o[row_out(j) * kD + d] = o;
        if (d == 0) { p.ws_ml[row_out(j) * 2] = m_ref[j]; p.ws_ml[row_out(j) * 2 + 1] = L; }
      }
    };
    if (ntile == 0) {  // no keys: a zero output, or an empty partial for the combine (block-uniform)
      if (item + 1 < i_end) prologue(item_at(item + 1));
      if (tid < kD) {
#pragma unroll
        for (int j = 0; j < R; ++j) {
          if (j < cur.skip) continue;
          if (nsplit == 1) {
            out_ptr(j)[tid] = from_f<T>(0.f);
          } else {
            p.ws_o[row_out(j) * kD + tid] = 0.f;
            if (tid == 0) { p.ws_ml[row_out(j) * 2] = kNegInf; p.ws_ml[row_out(j) * 2 + 1] = 0.f; }
          }
        }
      }
      continue;
    }
    const int64_t* pos_g = p.positions + b * p.pos_sb;
    const uint8_t* kcodes = p.k_codes + head_row(cur);
    const uint8_t* vcodes = p.v_codes + head_row(cur);
    // a short item (one tile of at most p.direct_max tokens) of a c = 8 GQA block takes P.V straight from its value
    // codes (see the end of the item): no histogram to clear, flush (to global memory) or multiply (block-uniform)
    const bool direct = direct_item(cur);

    // ---- per-item state (the previous item's last reads of the histograms, red and the columns are behind the
    // barrier that ends it). A direct item needs its kv head's value table in the histograms' space: copied by the
    // prologue, or here when the previous item's epilogue still used that space (one more commit group, waited for
    // with the tile's); its tile's scatter adds only zeros there (no p yet before the tile). Other items clear the
    // bins (and so the table).
    if (direct) {
      if (vtab_hk != cur.hk) {
        load_vtab(cur.hk);
        cp_async_commit();
      }
    } else {
      if constexpr (kDirect) vtab_hk = -1;
      for (int i = tid; i < R * C::kHeadStride / 4; i += kNT)
        reinterpret_cast<uint4*>(smem + C::kOffHist)[i] = make_uint4(0u, 0u, 0u, 0u);
      if constexpr (R > 1)
        for (int i = tid; i < R * C::kBinsHead; i += kNT) gacc[i] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if constexpr (!kPre) {
        const T* qp = reinterpret_cast<const T*>(p.q) + b * p.q_sb + (qh0 + j) * p.q_sh;
        qa[j] = to_f<T>(qp[fi]) * qscale;
        qb[j] = to_f<T>(qp[fi + 64]) * qscale;
      } else {
        qa[j] = to_f<T>(qn[2 * j]) * qscale;
        qb[j] = to_f<T>(qn[2 * j + 1]) * qscale;
      }
    }
    nrec = kColReinit;  // exact angles for the first tile
    // ---- tile 0: base position, regularity, columns
    int64_t P_tile = pos_g[t_begin];
    bool irr;
    {
      const int n0 = min(kTile, t_end - t_begin);
      bool bad = false;
      for (int i = tid; i < n0; i += kNT) bad |= pos_g[t_begin + i] != P_tile + i;
      columns(P_tile, 0);
      irr = __syncthreads_or(bad);
    }
#pragma unroll
    for (int k = 0; k < (R == 1 ? kBinsPerThread : 1); ++k) acc[k] = 0.f;
#pragma unroll
    for (int j = 0; j < R; ++j) { m_ref[j] = kNegInf; mass_acc[j] = 0.f; }
    l_r = 0.f;
    ptile_r = 0.f;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      pbw[j * kNW * kPBufStride + lane] = 0u;
      pbw[j * kNW * kPBufStride + 36 + lane] = 0u;
    }
    __syncwarp();

    // a direct item (one tile, its second stage group empty) waits for every copy, the value table too (the tile's
    // barrier below makes them visible to the block)
    if (kDirect && direct) cp_async_wait<0>();
    for (int it = 0; it < ntile; ++it) {
      cp_async_wait<kMStages - 2>();
      __syncthreads();
      const uint8_t* sv_prev = vstage((it + kMStages - 1) % kMStages);  // tile it - 1
      const int t0 = t_begin + it * kTile;
      const int n = min(kTile, t_end - t0);
      const uint8_t* sk = kstage(it % C::kKStages);
      // positions of the next tile, used after the scores
      const bool has_next = it + 1 < ntile;
      const int t0n = t0 + kTile;
      const int nn = has_next ? min(kTile, t_end - t0n) : 0;
      int64_t Pn = 0, pn[C::kTokPerThread];
#pragma unroll
      for (int j = 0; j < C::kTokPerThread; ++j) pn[j] = 0;
      if (has_next) {
        Pn = pos_g[t0n];
#pragma unroll
        for (int j = 0; j < C::kTokPerThread; ++j)
          if (tid + j * kNT < nn) pn[j] = pos_g[t0n + tid + j * kNT];
      }
      // this thread's B fragments (query column g of each head's n-tile, its k-slots): in registers for R == 1, read
      // from shared memory at each use for R > 1
      const uint8_t* bsrc = smem + C::kOffB + (it & 1) * 8 * R * kBRow + g * kBRow + r * 16;
      uint4 bq[R == 1 ? 4 : 1];
      if constexpr (R == 1) {
#pragma unroll
        for (int a = 0; a < 4; ++a) bq[a] = *reinterpret_cast<const uint4*>(bsrc + a * 64);
      }

      // ---- scores: m-tile v holds keys 2v*64 + 8 wt + g (row g) and that + 64 (row g + 8). R == 1: lane r keeps
      // m-tile r's scores (s0, s1). R > 1: the n-tile of m-tile v packs the R heads' columns 2v, 2v + 1 (column c: head
      // c / 2, column 2v + c % 2; c >= 2R repeat head R - 1), so one MMA chain scores every head and lane r keeps head
      // r's scores of each m-tile (sv0[v], sv1[v]); lanes r >= R hold none.
      float s0 = kNegInf, s1 = kNegInf, sv0[kMT], sv1[kMT];
      // R > 1: this lane's B column row (head min(g / 2, R - 1), column g % 2 of the m-tile's pair; + 2v kBRow)
      const uint8_t* bpk =
          smem + C::kOffB + (it & 1) * 8 * R * kBRow + (8 * min(g >> 1, R - 1) + (g & 1)) * kBRow + r * 16;
      // kPart: a tile that ends before kTile tokens (an item's last or only one) skips the m-tiles with no key in it;
      // full tiles are compiled without that test (in every tile it cost the CQ-8c8b MHA block 10% at 8 x 32K), and
      // only kShort blocks have the partial-tile path (see kShort)
      auto mtiles = [&](auto irregular, auto partial) {
        constexpr bool kIrr = decltype(irregular)::value, kPart = decltype(partial)::value;
#pragma unroll
        for (int vv = 0; vv < kMT; ++vv) {
          const int v = kMT * wh + vv;
#pragma unroll
          for (int pp = 0; pp < C::kParts; ++pp) scatter(sv_prev, vv * C::kParts + pp);
          // no key of this warp's rows in the tile (its end, t_end): no scores to compute (masked below)
          if (kPart && 2 * v * kDelta + 8 * wt >= n) continue;
          const int offx = 2 * v * kDelta + 8 * wt + g, offy = offx + kDelta;
          // the key code words of this lane (c = 4: its half of the permuted row)
          const int cofs = KC == 8 ? 0 : (r >> 1) * 16;
          const uint4 cx = *reinterpret_cast<const uint4*>(sk + offx * kRB + cofs);
          const uint4 cy = *reinterpret_cast<const uint4*>(sk + offy * kRB + cofs);
          const uint8_t* bcol = R == 1 ? bsrc : bpk + 2 * v * kBRow;
          float sx, sy;
          if constexpr (kIrr) {  // each key at its own position, relative to its column's P_tile + 64 n
            const int64_t bx = P_tile + 2 * v * kDelta, by = bx + kDelta;
            const float px = static_cast<float>((offx < n ? pos_g[t0 + offx] : bx) - bx);
            const float py = static_cast<float>((offy < n ? pos_g[t0 + offy] : by) - by);
            const float2 sc =
                irregular_mtile<T, KC>(smem + kOffTab, bcol, cx, cy, lane, px, py, p.inv_freq, C::kCopies);
            sx = sc.x;
            sy = sc.y;
          } else {
            float d[2][4] = {};  // two accumulator chains (hh = 0, 1) for overlap
            // c = 4: the rows of odd g, whose chunks hold words 2, 3 first, accumulate with the B words swapped
            float ds[2][4] = {};
            // chunk pairs (a, a + 2), a = 0, 1: gather, rotate, multiply; one pair's keys live at a time
#pragma unroll
            for (int a = 0; a < 2; ++a) {
              const uint4 xlo = gather(word(cx, a), a), xhi = gather(word(cx, a + 2), a + 2);
              const uint4 ylo = gather(word(cy, a), a), yhi = gather(word(cy, a + 2), a + 2);
              uint32_t fr[2][2][4];
              rotate_key<T, 0>(xlo, xhi, rk.c[a], rk.s[a], rk.ns[a], fr);
              rotate_key<T, 1>(ylo, yhi, rk.c[a], rk.s[a], rk.ns[a], fr);
              if constexpr (R == 1) {
                pair_mma<T>(d[0], d[1], fr, bq[a], bq[a + 2]);
                if constexpr (KC == 4) pair_mma_swapped<T>(ds[0], ds[1], fr, bq[a], bq[a + 2]);
              } else if constexpr (KC == 8) {
                pair_mma<T>(d[0], d[1], fr, *reinterpret_cast<const uint4*>(bcol + a * 64),
                            *reinterpret_cast<const uint4*>(bcol + (a + 2) * 64));
              } else {
                const uint4 blo = *reinterpret_cast<const uint4*>(bcol + a * 64);
                const uint4 bhi = *reinterpret_cast<const uint4*>(bcol + (a + 2) * 64);
                pair_mma<T>(d[0], d[1], fr, blo, bhi);
                pair_mma_swapped<T>(ds[0], ds[1], fr, blo, bhi);
              }
            }
            if (KC == 4 && (g & 1)) {
              sx = ds[0][0] + ds[1][0];
              sy = ds[0][3] + ds[1][3];
            } else {
              sx = d[0][0] + d[1][0];
              sy = d[0][3] + d[1][3];
            }
          }
          if constexpr (R == 1) {
            if (r == v) { s0 = sx; s1 = sy; }
          } else {
            sv0[vv] = sx;
            sv1[vv] = sy;
          }
        }
      };
      if constexpr (kShort) {
        if (irr) mtiles(std::true_type{}, std::true_type{});
        else if (n < kTile) mtiles(std::false_type{}, std::true_type{});
        else mtiles(std::false_type{}, std::false_type{});
      } else {
        if (irr) mtiles(std::true_type{}, std::false_type{});
        else mtiles(std::false_type{}, std::false_type{});
      }
      if constexpr (R == 1) {
        if (o0 >= n) s0 = kNegInf;
        if (o0 + kDelta >= n) s1 = kNegInf;
      } else {
#pragma unroll
        for (int vv = 0; vv < kMT; ++vv) {
          const int ox = 2 * (kMT * wh + vv) * kDelta + 8 * wt + g;
          if (ox >= n || r >= R) sv0[vv] = kNegInf;
          if (ox + kDelta >= n || r >= R) sv1[vv] = kNegInf;
        }
      }

      // ---- tile max and the previous tile's mass per head, block-wide; the next tile's columns and regularity
      if constexpr (R == 1) {
        float mx = fmaxf(s0, s1), ms = ptile_r;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
          ms += __shfl_xor_sync(0xffffffffu, ms, off);
        }
        if (lane == 0) { red[warp] = mx; red[kNW + warp] = ms; }
      } else {  // each lane reduces its own head over the lanes of the same r
        float mx = kNegInf, ms = ptile_r;
#pragma unroll
        for (int vv = 0; vv < kMT; ++vv) mx = fmaxf(mx, fmaxf(sv0[vv], sv1[vv]));
#pragma unroll
        for (int off = 16; off >= 4; off >>= 1) {
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
          ms += __shfl_xor_sync(0xffffffffu, ms, off);
        }
        if (lane < R) { red[(2 * lane) * kNW + warp] = mx; red[(2 * lane + 1) * kNW + warp] = ms; }
      }
      bool bad = false;
      if (has_next) {
        columns(Pn, (it + 1) & 1);
#pragma unroll
        for (int j = 0; j < C::kTokPerThread; ++j) bad |= tid + j * kNT < nn && pn[j] != Pn + tid + j * kNT;
      }
      const bool irr_next = __syncthreads_or(bad);
      bool flushed = false;  // block-uniform
#pragma unroll
      for (int j = 0; j < R; ++j) {
        float tmax = kNegInf, mass = 0.f;
#pragma unroll
        for (int wi = 0; wi < kNW; ++wi) {
          tmax = fmaxf(tmax, red[(2 * j) * kNW + wi]);
          mass += red[(2 * j + 1) * kNW + wi];
        }
        mass_acc[j] += mass;
        if (tmax > m_ref[j]) {
          // every p so far was 0: the bins, accumulators and l are still 0
          if (kShort && m_ref[j] == kNegInf) {
            m_ref[j] = tmax;
            mass_acc[j] = 0.f;
          } else {
            const float scale = m_ref[j] == kNegInf ? 0.f : exp2f(m_ref[j] - tmax);
            flush(j, scale);
            if (R == 1 || r == j) l_r *= scale;
            m_ref[j] = tmax;
            mass_acc[j] = 0.f;
            flushed = true;
          }
        } else if (mass_acc[j] > kFlushMass) {
          flush(j, 1.f);
          mass_acc[j] = 0.f;
          flushed = true;
        }
      }
      if (flushed) __syncthreads();

      // ---- p (scattered during the next tile); the stage of tile it - 1 is free now: load tile it + 2 into it
      if constexpr (R == 1) {
        const float p0 = s0 == kNegInf ? 0.f : fast_exp2(s0 - m_ref[0]);
        const float p1 = s1 == kNegInf ? 0.f : fast_exp2(s1 - m_ref[0]);
        l_r += p0 + p1;
        ptile_r = p0 + p1;
        pbw[lane] = __float2uint_rn(p0 * kFix);
        pbw[36 + lane] = __float2uint_rn(p1 * kFix);
      } else {  // head r's p of m-tile v go where lane 4 g + v's would (the scatter's layout)
        float mr = m_ref[0];
#pragma unroll
        for (int j = 1; j < R; ++j) mr = r == j ? m_ref[j] : mr;
        float sum = 0.f;
#pragma unroll
        for (int vv = 0; vv < kMT; ++vv) {
          const float p0 = sv0[vv] == kNegInf ? 0.f : fast_exp2(sv0[vv] - mr);
          const float p1 = sv1[vv] == kNegInf ? 0.f : fast_exp2(sv1[vv] - mr);
          sum += p0 + p1;
          if (r < R) {
            pbw[r * kNW * kPBufStride + 4 * g + vv] = __float2uint_rn(p0 * kFix);
            pbw[r * kNW * kPBufStride + 36 + 4 * g + vv] = __float2uint_rn(p1 * kFix);
          }
        }
        l_r += sum;
        ptile_r = sum;
      }
      __syncwarp();
      {
        const int nt = it + kMStages - 1;
        if (nt < ntile) load_stage(nt % C::kKStages, nt % kMStages, kcodes, vcodes, t_begin + nt * kTile, t_end);
        cp_async_commit();
      }
      irr = irr_next;
      P_tile = Pn;
    }

    if (direct) {
      // ---- P.V of a short item straight from the codes (direct_pv: a centroid load and c FMAs per token, group and
      // head, where the histogram path pays its 256 codes x groups product whatever the item's length); the warps'
      // sums meet in the query columns' space (every warp's MMAs read them before the tile's block-wide max); its
      // share of l goes to red[2 R kNW + j kNW + warp] (the half of red that the tile loop does not use, so no barrier
      // is needed before these writes)
      float* part = reinterpret_cast<float*>(smem + C::kOffB);  // the columns were last read before the tile's max
      direct_pv<T, NW, R>(vstage(0) + kVRows, reinterpret_cast<const uint4*>(smem + C::kOffHist), pbw,
                          t_end - t_begin, part);
      float* lred = red + 2 * R * kNW;
      l_share(lred);
      __syncthreads();  // every warp's key gathers and stage reads are done; part and lred complete
      if (item + 1 < i_end) prologue(item_at(item + 1));
      for (int i = tid; i < R * kD; i += kNT) {
        const int j = i / kD, d = i % kD;
        if (j < cur.skip) continue;
        float s = 0.f, L = 0.f;
#pragma unroll
        for (int wi = 0; wi < kNW; ++wi) {
          s += part[(wi * R + j) * kD + d];
          L += lred[j * kNW + wi];
        }
        store(j, d, s, L);
      }
      __syncthreads();  // part and lred are read before the next item reuses them
      continue;
    }

    // ---- the last tile's scatter; then the next item's loads (key tables, first stages) overlap this epilogue
    __syncthreads();  // every warp's last key gathers are done
    {
      const uint8_t* sv_last = vstage((ntile - 1) % kMStages);
#pragma unroll
      for (int part = 0; part < 4; ++part) scatter(sv_last, part);
    }
    __syncthreads();  // every bin complete before the flush reads it; the stages are free
    if (item + 1 < i_end) prologue(item_at(item + 1), false);  // the bins are still in use: no value table
#pragma unroll
    for (int j = 0; j < R; ++j) flush(j, 1.f, !kShort);
    l_share(red);
    __syncthreads();  // every u32 bin read before the fp32 sums overwrite them

    // ---- histogram x value centroids. The fp32 bins, replicas summed, go to ht[j][gamma][code ^ sw(gamma)] (in
    // place of the u32 bins; the swizzle keeps these writes and the product's reads free of bank conflicts). Warp w
    // then takes value groups gamma = kGPW w .., each lane the codes lane + 32 k: one c-wide centroid load from global
    // memory (L2; coalesced along the codes) and c FMAs per code, group and head, summed over the lanes at the end.
    float* ht = reinterpret_cast<float*>(smem + C::kOffHist);
    auto sw = [](int gamma) { return KC == 8 ? 2 * gamma : gamma; };
#pragma unroll
    for (int j = 0; j < R; ++j) {
#pragma unroll
      for (int k = 0; k < kBinsPerThread; ++k) {
        const int idx = tid + kNT * k, code = idx / kSlots, gamma = idx & (kGroups - 1);
        float v;
        if constexpr (R == 1) v = acc[k];
        else v = gacc[j * C::kBinsHead + idx];
        if constexpr (C::kRep == 2) v += __shfl_xor_sync(0xffffffffu, v, 16);  // slot gamma + 16 is lane ^ 16
        if (C::kRep == 1 || lane < 16) ht[(j * kGroups + gamma) * kCodes + (code ^ sw(gamma))] = v;
      }
    }
    __syncthreads();
    constexpr int kGPW = kGroups / kNW;  // value groups per warp
    using VT = typename std::conditional<KC == 8, uint4, uint2>::type;  // one value centroid (c 16-bit channels)
    const VT* vrow =
        reinterpret_cast<const VT*>(p.v_cent) + static_cast<int64_t>(cur.hk) * kGroups * kCodes;  // [gamma][code]
    float o[R][kGPW][KC] = {};
    VT raws[kCodes / 32][kGPW];  // every load issued before the first use: one L2 latency, not eight
#pragma unroll
    for (int k = 0; k < kCodes / 32; ++k)
#pragma unroll
      for (int gi = 0; gi < kGPW; ++gi) raws[k][gi] = __ldg(vrow + (kGPW * warp + gi) * kCodes + lane + 32 * k);
#pragma unroll
    for (int k = 0; k < kCodes / 32; ++k) {
      const int code = lane + 32 * k;
#pragma unroll
      for (int gi = 0; gi < kGPW; ++gi) {
        const int gamma = kGPW * warp + gi;
        const VT raw = raws[k][gi];
        float vf[KC];
#pragma unroll
        for (int e = 0; e < KC / 2; ++e) {
          const float2 f = unpack2<T>(word(raw, e));
          vf[2 * e] = f.x;
          vf[2 * e + 1] = f.y;
        }
#pragma unroll
        for (int j = 0; j < R; ++j) {
          const float h = ht[(j * kGroups + gamma) * kCodes + (code ^ sw(gamma))];
#pragma unroll
          for (int e = 0; e < KC; ++e) o[j][gi][e] = fmaf(h, vf[e], o[j][gi][e]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      float L = 0.f;
#pragma unroll
      for (int wi = 0; wi < kNW; ++wi) L += red[j * kNW + wi];
      if constexpr (LONG) {  // butterflies: each lane ends with every sum (the LONG block's measured schedule)
#pragma unroll
        for (int gi = 0; gi < kGPW; ++gi) {
#pragma unroll
          for (int e = 0; e < KC; ++e) {
            float oj = o[j][gi][e];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) oj += __shfl_xor_sync(0xffffffffu, oj, off);
            o[j][gi][e] = oj;
          }
          // lane e of the warp writes channel c gamma + e
          float mine = 0.f;
#pragma unroll
          for (int e = 0; e < KC; ++e) mine = lane == e ? o[j][gi][e] : mine;
          const int d = KC * (kGPW * warp + gi) + lane;
          if (lane < KC && j >= cur.skip) store(j, d, mine, L);
        }
      } else {
        // the warp's kGPW x KC channel sums over its 32 lanes (reduce_scatter): value gi KC + e = channel
        // KC (kGPW warp + gi) + e ends in lanes (gi KC + e) (32 / kGPW KC) .., the first of which writes it
        constexpr int kVals = kGPW * KC, kLanesPer = 32 / kVals;
        float vals[kVals];
#pragma unroll
        for (int gi = 0; gi < kGPW; ++gi)
#pragma unroll
          for (int e = 0; e < KC; ++e) vals[gi * KC + e] = o[j][gi][e];
        const float mine = reduce_scatter<kVals>(vals, lane);
        const int d = KC * kGPW * warp + lane / kLanesPer;
        if (lane % kLanesPer == 0 && j >= cur.skip) store(j, d, mine, L);
      }
    }
    __syncthreads();  // the bins and red are read before the next item reuses them
  }
}
template <typename T, int NW, int R, int KC = 8, bool LONG = false>
cudaError_t launch_mma_t(const AttnParams& p, cudaStream_t stream) {
  using C = Cfg<NW, R, KC>;
  static SmemOptIn opt_in;
  if (cudaError_t e = opt_in.ensure(decode_mma_kernel<T, NW, R, KC, LONG>, C::kSmem); e != cudaSuccess) return e;
  decode_mma_kernel<T, NW, R, KC, LONG><<<p.mma_blocks, C::kNT, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dt(const AttnParams& p, cudaStream_t stream) {
  if (p.k_c == 4)  // mma_decode_applies: 8 warps
    return mma_group(p) == 2 ? launch_mma_t<T, 8, 2, 4>(p, stream) : launch_mma_t<T, 8, 1, 4>(p, stream);
  if (p.variant == 2) return launch_mma_t<T, 16, 1>(p, stream);
  switch (mma_group(p)) {
    case 2: return launch_mma_t<T, 8, 2>(p, stream);
    case 3: return launch_mma_t<T, 8, 3>(p, stream);
    case 4: return launch_mma_t<T, 8, 4>(p, stream);
    default: return p.mma_long ? launch_mma_t<T, 8, 1, 8, true>(p, stream) : launch_mma_t<T, 8, 1>(p, stream);
  }
}

bool aligned16(const void* x) { return (reinterpret_cast<uintptr_t>(x) & 15) == 0; }

size_t mma_smem(const AttnParams& p) {
  if (p.k_c == 4) return mma_group(p) == 2 ? Cfg<8, 2, 4>::kSmem : Cfg<8, 1, 4>::kSmem;
  if (p.variant == 2) return Cfg<16, 1>::kSmem;
  switch (mma_group(p)) {
    case 2: return Cfg<8, 2>::kSmem;
    case 3: return Cfg<8, 3>::kSmem;
    case 4: return Cfg<8, 4>::kSmem;
    default: return Cfg<8, 1>::kSmem;
  }
}

}  // namespace

// Query heads per block (8 warps): a GQA group of rep heads runs as mma_head_blocks = ceil(rep / 4) blocks per kv
// head of R = ceil(rep / blocks) heads (8 -> 4 + 4, 6 -> 3 + 3; 7 -> 4 + 4 and 5 -> 3 + 3 with one head computed by
// two blocks; c = 4: ceil(rep / 2) blocks of 2, 3 -> 2 + 2); R = 1 for MHA and the 16-warp variant (a block per
// query head).
int mma_group(const AttnParams& p) {
  const int rep = p.Hq / p.Hkv;
  if (p.variant != 1 || rep < 2) return 1;
  return (rep + mma_head_blocks(p) - 1) / mma_head_blocks(p);
}

int mma_head_blocks(const AttnParams& p) {
  const int rep = p.Hq / p.Hkv;
  const int most = p.k_c == 4 ? 2 : 4;  // c = 4: two histograms of 32 KB fit, not more
  return p.variant != 1 || rep < 2 ? rep : (rep + most - 1) / most;
}

// fp32 scratch of the GQA blocks: per block, reused by its items
size_t mma_hist_floats(const AttnParams& p) {
  const int R = mma_group(p);
  if (R == 1) return 0;
  const int slots = p.k_c == 4 ? 32 : 16 * (R <= 2 ? 2 : 1);  // Cfg::kSlots
  return static_cast<size_t>(p.mma_blocks) * R * kCodes * slots;
}

bool mma_direct_split(const AttnParams& p) { return p.k_c == 8 && mma_group(p) > 1 && p.direct_max >= kMinDirectSplit; }

// The kernel's key-gather addresses assume that dynamic shared memory starts at shared address kSharedWindow (the
// 1 KiB the driver reserves per block on sm_80/sm_90). Elsewhere the CUDA-core kernel runs instead.
bool smem_window_ok() {
  static const bool ok = [] {
    int dev = 0, reserved = -1;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev) != cudaSuccess) return false;
    return static_cast<uint32_t>(reserved) == kSharedWindow;
  }();
  return ok;
}

// variant 1: 8 warps per block, variant 2: 16 warps per block, variant 3: 8 warps and a block per query head (R = 1)
// also for GQA. 8-bit codes with c = 8 for K and V, or c = 4 for both (CQ-4c8b) with 8 warps.
bool mma_decode_applies(const AttnParams& p, size_t max_smem) {
  const bool c8 = p.k_c == 8 && p.v_c == 8 && p.k_rb == kD / 8 && p.v_rb == kD / 8;
  const bool c4 = p.k_c == 4 && p.v_c == 4 && p.k_rb == kD / 4 && p.v_rb == kD / 4 && p.variant != 2;
  return p.variant >= 1 && p.variant <= 3 && smem_window_ok() && p.D == kD && p.Q == 1 && p.Hq % p.Hkv == 0 &&
         p.k_bits == 8 && p.v_bits == 8 && (c8 || c4) && aligned16(p.k_codes) && aligned16(p.v_codes) &&
         p.k_tab != nullptr && aligned16(p.k_tab) && p.v_tab != nullptr && aligned16(p.v_tab) && aligned16(p.v_cent) &&
         mma_smem(p) <= max_smem;
}

cudaError_t launch_mma_decode(const AttnParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return p.dtype == kBF16 ? launch_dt<__nv_bfloat16>(p, stream) : launch_dt<__half>(p, stream);
}

}  // namespace cq
