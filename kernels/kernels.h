// Host-side interface of the CQ kernels: plain parameter structs and launchers (no torch types), so that the
// .cu files build with nvcc alone and binding.cpp is the only file that sees ATen.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace cq {

// Element type tag passed from the host.
enum DType : int { kF16 = 0, kBF16 = 1 };

struct EncodeParams {
  const void* x;  // [B, H, Q, D]
  int64_t x_sb, x_sh, x_sq;  // element strides; last dim contiguous
  const void* centroids;  // [H, G, 2**bits, c] contiguous
  uint8_t* codes;  // [B, H, cap, R] contiguous
  int B, H, Q, D, G, c, bits, R;
  int64_t cap, start;
  const int64_t* rows;  // [Q] on the device: token t goes to row rows[t] (static decoding); nullptr: row start + t
  int dtype;  // cq::DType
  int tiled_min;  // B * Q rows from which the tiled kernel runs (0: never; kernels/encode.cu)
  int use_mma;    // from tiled_min rows: the tensor-core kernel where it applies (3 <= bits <= 10), else the tiled one
};

// A full-precision K or V buffer [B, H_kv, n, D] (last dim contiguous); data == nullptr when absent.
struct FpBuf {
  const void* data;
  int64_t sb, sh, st;
};

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 without a division instruction sequence: q = (umulhi(n, m) + n) >> s
// with s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1 (division by invariant integers, Granlund and
// Montgomery 1994). Built on the host once per launch (fast_div), used on the device by fdiv (common.cuh).
struct FastDiv {
  uint32_t m;
  int s;
};
inline FastDiv fast_div(int d) {
  int s = 0;
  while ((int64_t{1} << s) < d) ++s;
  const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << s) - static_cast<uint64_t>(d))) / static_cast<uint64_t>(d) + 1;
  return FastDiv{static_cast<uint32_t>(m), s};
}

struct AttnParams {
  // queries [B, H_q, Q, D] (post-RoPE), last dim contiguous
  const void* q;
  int64_t q_sb, q_sh, q_sq;
  // packed codes [B, H_kv, cap, R] contiguous; the first S rows are valid
  const uint8_t* k_codes;
  const uint8_t* v_codes;
  int64_t cap;
  int k_rb, v_rb;
  // centroids [H_kv, G, 2**bits, c] contiguous, same dtype as q
  const void* k_cent;
  const void* v_cent;
  int k_c, k_bits, k_groups, v_c, v_bits, v_groups;
  // decode: the same centroids code-major, [H_kv, 2**bits, D] contiguous (row = one code's D channels), or nullptr.
  // The decode kernels' shared-memory tables are those rows, so a block copies its head's table linearly (from the
  // group-major centroids that copy gathered 16-byte pieces 4 KB apart: H100, 3.7 of a 1 x 1K MHA block's 15.5 us)
  const void* k_tab;
  const void* v_tab;
  // RoPE of the cached keys: positions [B, S] int64, inv_freq [D/2] fp32, cos/sin scaled by rope_scale
  const int64_t* positions;
  int64_t pos_sb;
  const float* inv_freq;
  float rope_scale;
  // prefill only: cos/sin table [B, S, D] fp32 (transformers' layout, halves repeated)
  const float* cos_t;
  const float* sin_t;
  int64_t cs_sb;
  // allowed key range per (b, query): range[(b * Q + i) * 2 + {0, 1}] = [lo, hi)
  const int* range;
  // full precision: window tokens start-w..start-1, new tokens start..S-1, sinks 0..n_sink-1
  FpBuf win_k, win_v, new_k, new_v, sink_k, sink_v;
  int win_len, n_sink, window;
  int B, Hq, Hkv, Q, S, start, D;
  // static decoding (one query, replayed as a CUDA graph; nullptr otherwise): the query's cache index is *dev_start,
  // in device memory, instead of start, and the window is a ring of win_len == window rows: key j of the window (the
  // new token included) at row j % win_len of win_k / win_v (new_k / new_v unused)
  const int64_t* dev_start;
  float scaling;
  int dtype;
  // outputs: out [B, Q, H_q, D]; split-K partials ws_o [B, H_q, Q, nsplit, D], ws_ml [B, H_q, Q, nsplit, 2]
  void* out;
  int64_t o_sb, o_sq, o_sh;
  float* ws_o;
  float* ws_ml;
  int nsplit;  // code splits (blocks along the sequence) + 1 when the full-precision block runs
  int has_fp;
  int nq, nchunk;  // queries per block (compile-time bucket) and chunks of H_q/H_kv * Q queries
  int tab_smem;  // centroid tables in shared memory
  int tile;  // decode: tokens per pipeline stage
  int variant;  // request: 0 = the CUDA-core decode kernel only, 1 (2) = the tensor-core decode kernel with 8 (16)
                // warps per block where it applies, 3 = with 8 warps and a block per query head also for GQA (each
                // block gathers its kv head's keys: for short calls, whose time is the block's latency, not work)
  int mma;  // plan: 1 when the tensor-core decode kernel (decode_mma.cu) runs
  float* ws_hist;  // tensor-core decode with a GQA group per block: fp32 histogram accumulators (mma_hist_floats)
  int max_blocks;  // request: at most this many tensor-core decode blocks (0: one per SM)
  int mma_blocks;  // plan: tensor-core decode blocks; each takes a contiguous run of the H_kv * mma_nhb * B * (code
                   // splits) items
  int mma_nhb;     // plan: head blocks per kv head (mma_head_blocks)
  int direct_max;  // request: tensor-core decode items of one tile with at most this many tokens take P.V straight
                   // from the codes instead of through a histogram (0: never)
  FastDiv div_ncode, div_b, div_nhb;  // plan: tensor-core decode, divisions by its code splits, B and mma_nhb
  int long_min;  // request: CQ-8c8b MHA tensor-core decode (8 warps) items of at least this many tokens run its LONG
                 // build, the schedule measured fastest on long items (decode_mma.cu)
  int mma_long;  // plan: 1 when that LONG build runs
};

// Shared memory the decode kernel needs for a given configuration (0 when it cannot run).
size_t decode_smem_bytes(const AttnParams& p);
// Choose queries per block, chunks, table placement, tile and splits (sets nq, nchunk, tab_smem, tile, has_fp, nsplit).
cudaError_t plan_decode(AttnParams& p, int num_sms, size_t max_smem);
cudaError_t launch_encode(const EncodeParams& p, cudaStream_t stream);
// Full-precision rows written by the same launch as an encode (static decoding's window ring): for j = 0 (keys after
// RoPE), 1 (values), dst[j][b, h, rows[t]] = src[j][b, h, t] for t < Q (rows outside [0, cap) are skipped). 16-bit
// elements, D of them per row, last dims contiguous; strides in elements.
struct RingWrite {
  const void* src[2];
  void* dst[2];
  int64_t s_sb[2], s_sh[2], s_sq[2];
  int64_t d_sb[2], d_sh[2], d_st[2];
  const int64_t* rows;  // [Q] on the device
  int64_t cap;          // rows in each dst
  int B, H, Q, D;
  int vec;  // 1: every row start 16-byte aligned (16-byte copies), 0: 2-byte copies
};
// The keys and the values of a layer in one launch: the same B, Q, H, G, c and dtype (bits, rows, start may differ);
// ring (nullptr: none) adds its row copies as one more slice of blocks of that launch (no launch of its own)
cudaError_t launch_encode_kv(const EncodeParams& k, const EncodeParams& v, cudaStream_t stream,
                             const RingWrite* ring = nullptr);
// fp_stream (nullptr: stream): where the tensor-core decode's full-precision split runs, forked from and joined back
// to stream by events
cudaError_t launch_decode(const AttnParams& p, cudaStream_t stream, cudaStream_t fp_stream = nullptr);
// out <- merge of the nsplit partials in ws_o / ws_ml (split-K combine)
cudaError_t launch_combine(const AttnParams& p, cudaStream_t stream);
// One query per query head (Q == 1): attention over the sinks and the full-precision window alone, written as split
// nsplit - 1's partial (the tensor-core decode's last split)
cudaError_t launch_fp_split(const AttnParams& p, cudaStream_t stream);
// Tensor-core decode kernel: whether it applies (variant 1, 2 or 3, one query per query head, any GQA ratio, head_dim
// 128, 8-bit codes with c = 8 for K and V or, MHA with 8 warps only, c = 4 for both; 16-byte aligned buffers, its
// shared memory fits), and its launch over the
// codes; launch_decode then runs launch_fp_split when there is a full-precision split, and the split-K combine when
// there are several splits.
bool mma_decode_applies(const AttnParams& p, size_t max_smem);
// Query heads per tensor-core decode block (2 to 4 heads of a GQA group share each key's gather and rotation; 1: a
// block per query head): mma_group is R, mma_head_blocks the blocks per kv head (ceil(group / R); when R does not
// divide the group the last block overlaps the one before it and writes only its own heads), mma_hist_floats the fp32
// scratch that blocks of several heads need (0 for R = 1).
int mma_group(const AttnParams& p);
int mma_head_blocks(const AttnParams& p);
size_t mma_hist_floats(const AttnParams& p);
// Whether the tensor-core decode splits sequences into items of one tile of min(direct_max, 512) tokens, whose P.V
// its c = 8 GQA blocks take straight from the codes (direct_max >= 128)
bool mma_direct_split(const AttnParams& p);
cudaError_t launch_mma_decode(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_prefill(const AttnParams& p, cudaStream_t stream);
// Dense RoPE'd keys and values [B, H_kv, S, D] (dtype) from the first S cached codes (uses the code, centroid and
// cos/sin fields of p): the prefill path that leaves the attention to torch SDPA.
cudaError_t launch_dequant(const AttnParams& p, void* kout, void* vout, cudaStream_t stream);

}  // namespace cq
