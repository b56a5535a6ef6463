// Torch binding of the CQ kernels: argument checks, parameter structs, workspace, launch on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <array>
#include <initializer_list>
#include <map>
#include <tuple>
#include <utility>

#include "kernels.h"

namespace {

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "cqtool kernel ", what, " failed: ", cudaGetErrorString(e));
}

int dtype_tag(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return cq::kF16;
  if (t.scalar_type() == at::kBFloat16) return cq::kBF16;
  TORCH_CHECK(false, "cqtool kernels take float16 or bfloat16 tensors, got ", t.scalar_type());
  return -1;
}

// Every tensor a kernel reads must be on the device it runs on (a model spread over GPUs keeps each layer's cache on
// that layer's device); a pointer from another GPU would be an illegal address there.
void check_device(const char* what, const at::Device& dev, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  for (const auto& [name, t] : ts)
    TORCH_CHECK(!t->defined() || t->device() == dev, what, ": ", name, " is on ", t->device(), ", the kernel runs on ", dev);
}

const at::Tensor& opt(const c10::optional<at::Tensor>& t) {
  static const at::Tensor none;
  return t.has_value() ? *t : none;
}

cq::FpBuf fp_buf(const c10::optional<at::Tensor>& t, int64_t D, at::ScalarType dt) {
  cq::FpBuf f{nullptr, 0, 0, 0};
  if (!t.has_value() || !t->defined()) return f;
  TORCH_CHECK(t->is_cuda() && t->dim() == 4 && t->size(3) == D && t->stride(3) == 1 && t->scalar_type() == dt,
              "full-precision K/V must be [B, H_kv, n, D] on the GPU with a contiguous last dim and the query dtype");
  f.data = t->data_ptr();
  f.sb = t->stride(0);
  f.sh = t->stride(1);
  f.st = t->stride(2);
  return f;
}

// fp32 scratch kept between calls (grown on demand) so that decode steps allocate nothing but the output; slot 0:
// split-K partials, slot 1: histogram accumulators of the tensor-core decode with several query heads per block.
// One per (GPU, stream): launches on two streams of a GPU (micro-batches, pipeline.MicroBatches) may run at the same
// time; every GPU's default stream has the same handle, hence the device in the key. Allocated on that stream, so the
// caching allocator reuses a replaced buffer only after that stream's work on it.
at::Tensor& workspace(int64_t n_floats, const at::Device& dev, int slot = 0) {
  static std::map<std::pair<int, int64_t>, std::array<at::Tensor, 2>> ws;  // callers hold the GIL
  at::Tensor& w = ws[{dev.index(), at::cuda::getCurrentCUDAStream(dev.index()).id()}][slot];
  if (!w.defined() || w.numel() < n_floats || w.device() != dev)
    w = at::empty({std::max<int64_t>(n_floats, 1 << 20)}, at::TensorOptions().dtype(at::kFloat).device(dev));
  return w;
}

// A layer's code buffers [B, H_kv, cap, R] (uint8, the first S rows valid) and centroids [H_kv, G, 2**bits, c] into p,
// checked; `what` names the op in the messages.
void set_codes(cq::AttnParams& p, const at::Tensor& k_codes, const at::Tensor& v_codes, const at::Tensor& k_cent,
               const at::Tensor& v_cent, int64_t k_bits, int64_t v_bits, int64_t S, const char* what) {
  TORCH_CHECK(k_codes.is_contiguous() && v_codes.is_contiguous() && k_codes.scalar_type() == at::kByte &&
              v_codes.scalar_type() == at::kByte && k_codes.size(2) == v_codes.size(2) && k_codes.size(2) >= S,
              what, ": code buffers");
  TORCH_CHECK(k_cent.size(2) == (int64_t(1) << k_bits) && v_cent.size(2) == (int64_t(1) << v_bits), what,
              ": 2**bits centroids");
  TORCH_CHECK(k_codes.size(3) == (k_cent.size(1) * k_bits + 7) / 8 && v_codes.size(3) == (v_cent.size(1) * v_bits + 7) / 8,
              what, ": code row bytes");
  p.k_codes = k_codes.data_ptr<uint8_t>(); p.v_codes = v_codes.data_ptr<uint8_t>();
  p.cap = k_codes.size(2); p.k_rb = k_codes.size(3); p.v_rb = v_codes.size(3);
  p.k_cent = k_cent.data_ptr(); p.v_cent = v_cent.data_ptr();
  p.k_c = k_cent.size(3); p.k_bits = k_bits; p.k_groups = k_cent.size(1);
  p.v_c = v_cent.size(3); p.v_bits = v_bits; p.v_groups = v_cent.size(1);
}

// The cache's RoPE table cos/sin [B or 1, >=S, D] fp32 into p, checked.
void set_cos_sin(cq::AttnParams& p, const at::Tensor& cos, const at::Tensor& sin, int64_t S, int64_t D, const char* what) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.stride(2) == 1 && cos.stride(1) == D && cos.size(1) >= S &&
              sin.strides() == cos.strides(), what, ": cos/sin must be [B, >=S, D] fp32");
  p.cos_t = cos.data_ptr<float>(); p.sin_t = sin.data_ptr<float>(); p.cs_sb = cos.size(0) == 1 ? 0 : cos.stride(0);
}

// A layer's centroids code-major ([H_kv, 2**bits, D] contiguous, their dtype and GPU: the decode kernels' table
// rows), or nullptr when not given
const void* code_major_rows(const c10::optional<at::Tensor>& rows, const at::Tensor& cent, const char* what) {
  if (!rows.has_value() || !rows->defined()) return nullptr;
  const at::Tensor& t = *rows;
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.scalar_type() == cent.scalar_type() && t.device() == cent.device() &&
              t.size(0) == cent.size(0) && t.size(1) == cent.size(2) && t.size(2) == cent.size(1) * cent.size(3),
              "attention: ", what, " must be the centroids code-major, [H_kv, 2**bits, D] contiguous, in their dtype and "
              "on their GPU");
  return t.data_ptr();
}

// Device-side rows (static decoding): int64 [Q], contiguous, on x's GPU; their data pointer
const int64_t* device_rows(const at::Tensor& rows, const at::Tensor& x, int64_t Q, const char* what) {
  TORCH_CHECK(rows.is_cuda() && rows.device() == x.device() && rows.scalar_type() == at::kLong && rows.dim() == 1 &&
              rows.numel() == Q && rows.is_contiguous(), what, " must be int64 [Q] on x's GPU");
  return rows.data_ptr<int64_t>();
}

}  // namespace

// x [B, H, Q, D]; centroids [H, G, 2**bits, c]; codes [B, H, cap, R] uint8: codes[:, :, start:start+Q] = pack(encode(x)),
// or codes[:, :, rows[t]] for token t when rows (int64 [Q] on the GPU, each in [0, cap)) is given.
cq::EncodeParams encode_params(const at::Tensor& x, const at::Tensor& centroids, int64_t bits, at::Tensor& codes,
                               int64_t start, const at::Tensor* rows, int64_t tiled_min, bool use_mma) {
  TORCH_CHECK(x.is_cuda() && centroids.is_cuda() && codes.is_cuda(), "encode: tensors must be on the GPU");
  TORCH_CHECK(x.dim() == 4 && centroids.dim() == 4 && codes.dim() == 4, "encode: expected 4-d x, centroids, codes");
  TORCH_CHECK(x.stride(3) == 1 && centroids.is_contiguous() && codes.is_contiguous(), "encode: layout");
  TORCH_CHECK(codes.scalar_type() == at::kByte && x.scalar_type() == centroids.scalar_type(), "encode: dtypes");
  const int64_t B = x.size(0), H = x.size(1), Q = x.size(2), D = x.size(3);
  const int64_t G = centroids.size(1), c = centroids.size(3);
  TORCH_CHECK(centroids.size(0) == H && G * c == D && centroids.size(2) == (int64_t(1) << bits), "encode: shapes");
  TORCH_CHECK(codes.size(0) == B && codes.size(1) == H && start + Q <= codes.size(2) && codes.size(3) == (G * bits + 7) / 8,
              "encode: code buffer shape");
  check_device("encode", x.device(), {{"centroids", &centroids}, {"codes", &codes}});
  cq::EncodeParams p{};
  p.x = x.data_ptr();
  p.x_sb = x.stride(0); p.x_sh = x.stride(1); p.x_sq = x.stride(2);
  p.centroids = centroids.data_ptr();
  p.codes = codes.data_ptr<uint8_t>();
  p.B = B; p.H = H; p.Q = Q; p.D = D; p.G = G; p.c = c; p.bits = bits; p.R = codes.size(3);
  p.cap = codes.size(2); p.start = start;
  if (rows != nullptr) p.rows = device_rows(*rows, x, Q, "encode: rows");
  p.dtype = dtype_tag(x);
  p.tiled_min = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(tiled_min, INT32_MAX)));
  p.use_mma = use_mma ? 1 : 0;
  return p;
}

void encode_impl(const at::Tensor& x, const at::Tensor& centroids, int64_t bits, at::Tensor& codes, int64_t start,
                 const at::Tensor* rows, int64_t tiled_min, bool use_mma) {
  const cq::EncodeParams p = encode_params(x, centroids, bits, codes, start, rows, tiled_min, use_mma);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  check_cuda(cq::launch_encode(p, at::cuda::getCurrentCUDAStream()), "encode");
}

// tiled_min: B * Q rows from which the tiled or (use_mma, where it applies) the tensor-core kernel runs (0: never;
// kernels/encode.cu)
void encode(const at::Tensor& x, const at::Tensor& centroids, int64_t bits, at::Tensor& codes, int64_t start,
            int64_t tiled_min, bool use_mma) {
  encode_impl(x, centroids, bits, codes, start, nullptr, tiled_min, use_mma);
}

void encode_rows(const at::Tensor& x, const at::Tensor& centroids, int64_t bits, at::Tensor& codes, const at::Tensor& rows,
                 int64_t tiled_min, bool use_mma) {
  encode_impl(x, centroids, bits, codes, 0, &rows, tiled_min, use_mma);
}

// A layer's keys and values in one launch (the same shape [B, H, Q, D], channels per group and dtype; bits may differ)
void encode_kv_impl(const at::Tensor& k, const at::Tensor& k_cent, int64_t k_bits, at::Tensor& k_codes,
                    const at::Tensor& v, const at::Tensor& v_cent, int64_t v_bits, at::Tensor& v_codes, int64_t start,
                    const at::Tensor* rows, int64_t tiled_min, bool use_mma, const cq::RingWrite* ring = nullptr) {
  const cq::EncodeParams pk = encode_params(k, k_cent, k_bits, k_codes, start, rows, tiled_min, use_mma);
  const cq::EncodeParams pv = encode_params(v, v_cent, v_bits, v_codes, start, rows, tiled_min, use_mma);
  TORCH_CHECK(k.sizes() == v.sizes() && pk.c == pv.c && pk.dtype == pv.dtype && k.device() == v.device(),
              "encode_kv: keys and values need the same shape, channels per group, dtype and GPU");
  const at::cuda::OptionalCUDAGuard guard(k.device());
  check_cuda(cq::launch_encode_kv(pk, pv, at::cuda::getCurrentCUDAStream(), ring), "encode_kv");
}

void encode_kv(const at::Tensor& k, const at::Tensor& k_cent, int64_t k_bits, at::Tensor& k_codes, const at::Tensor& v,
               const at::Tensor& v_cent, int64_t v_bits, at::Tensor& v_codes, int64_t start, int64_t tiled_min,
               bool use_mma) {
  encode_kv_impl(k, k_cent, k_bits, k_codes, v, v_cent, v_bits, v_codes, start, nullptr, tiled_min, use_mma);
}

// ring (optional, static decoding's window): {keys after RoPE, values} [B, H, Q, D] written to {win_k, win_v}
// [B, H, W, D] at rows ring_rows (int64 [Q]) by the same launch (kernels/encode.cu, ring_copy)
void encode_kv_rows(const at::Tensor& k, const at::Tensor& k_cent, int64_t k_bits, at::Tensor& k_codes,
                    const at::Tensor& v, const at::Tensor& v_cent, int64_t v_bits, at::Tensor& v_codes,
                    const at::Tensor& rows, int64_t tiled_min, bool use_mma,
                    const c10::optional<at::Tensor>& ring_k, const c10::optional<at::Tensor>& ring_v,
                    const c10::optional<at::Tensor>& win_k, const c10::optional<at::Tensor>& win_v,
                    const c10::optional<at::Tensor>& ring_rows) {
  const bool any = ring_k.has_value() || ring_v.has_value() || win_k.has_value() || win_v.has_value() ||
                   ring_rows.has_value();
  if (!any) {
    encode_kv_impl(k, k_cent, k_bits, k_codes, v, v_cent, v_bits, v_codes, 0, &rows, tiled_min, use_mma);
    return;
  }
  TORCH_CHECK(ring_k.has_value() && ring_v.has_value() && win_k.has_value() && win_v.has_value() &&
              ring_rows.has_value(), "encode_kv_rows: the ring needs keys, values, both windows and its rows");
  const at::Tensor* src[2] = {&*ring_k, &*ring_v};
  const at::Tensor* dst[2] = {&*win_k, &*win_v};
  const int64_t B = k.size(0), H = k.size(1), Q = k.size(2), D = k.size(3);
  check_device("encode_kv_rows", k.device(),
               {{"ring keys", src[0]}, {"ring values", src[1]}, {"win_k", dst[0]}, {"win_v", dst[1]}});
  cq::RingWrite w{};
  w.B = B; w.H = H; w.Q = Q; w.D = D;
  w.rows = device_rows(*ring_rows, k, Q, "encode_kv_rows: ring rows");
  w.cap = dst[0]->size(2);
  bool vec = D % 8 == 0;
  for (int j = 0; j < 2; ++j) {
    const at::Tensor& a = *src[j];
    const at::Tensor& o = *dst[j];
    TORCH_CHECK(a.dim() == 4 && o.dim() == 4 && a.size(0) == B && a.size(1) == H && a.size(2) == Q && a.size(3) == D &&
                o.size(0) == B && o.size(1) == H && o.size(2) == w.cap && o.size(3) == D && a.stride(3) == 1 &&
                o.stride(3) == 1 && a.scalar_type() == o.scalar_type() && a.element_size() == 2,
                "encode_kv_rows: ring source [B, H, Q, D] and window [B, H, W, D], one 16-bit dtype");
    w.src[j] = a.data_ptr();
    w.dst[j] = o.data_ptr();
    w.s_sb[j] = a.stride(0); w.s_sh[j] = a.stride(1); w.s_sq[j] = a.stride(2);
    w.d_sb[j] = o.stride(0); w.d_sh[j] = o.stride(1); w.d_st[j] = o.stride(2);
    for (const int64_t st : {a.stride(0), a.stride(1), a.stride(2), o.stride(0), o.stride(1), o.stride(2)})
      vec = vec && (st % 8 == 0);
    vec = vec && reinterpret_cast<uintptr_t>(w.src[j]) % 16 == 0 && reinterpret_cast<uintptr_t>(w.dst[j]) % 16 == 0;
  }
  w.vec = vec ? 1 : 0;
  encode_kv_impl(k, k_cent, k_bits, k_codes, v, v_cent, v_bits, v_codes, 0, &rows, tiled_min, use_mma, &w);
}

// Attention of query [B, H_q, Q, D] over S cached tokens held as codes (+ full-precision window/sinks) -> [B, Q, H_q, D],
// and which kernel ran (0: decode, CUDA cores; 1: decode, tensor cores, 8 warps; 2: prefill; 3: decode, tensor cores,
// 16 warps; 4: decode, tensor cores, several query heads of a GQA group per block). variant 0 keeps the decode on the
// CUDA-core kernel, 1 (2) lets the tensor-core one with 8 (16) warps per block take the cases it covers, 3 the same with
// 8 warps and a block per query head also for GQA (reported as 1). k_rows /
// v_rows: the centroids code-major (ops.code_major_rows), whose rows the decode kernels copy into their shared-memory
// tables linearly; the tensor-core kernel runs only with k_rows, the CUDA-core kernel gathers from the centroids
// without them.
std::tuple<at::Tensor, int64_t> attention(
                     const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& v_codes, const at::Tensor& k_cent,
                     const at::Tensor& v_cent, int64_t k_bits, int64_t v_bits, const at::Tensor& positions,
                     const at::Tensor& inv_freq, double rope_scale, const c10::optional<at::Tensor>& cos,
                     const c10::optional<at::Tensor>& sin, const at::Tensor& range, const c10::optional<at::Tensor>& win_k,
                     const c10::optional<at::Tensor>& win_v, const at::Tensor& new_k, const at::Tensor& new_v,
                     const c10::optional<at::Tensor>& sink_k, const c10::optional<at::Tensor>& sink_v, int64_t window,
                     int64_t start, int64_t S, double scaling, bool prefill, int64_t variant,
                     int64_t max_blocks, int64_t direct_max, int64_t long_min,
                     const c10::optional<at::Tensor>& dev_start, bool fp_side_stream,
                     const c10::optional<at::Tensor>& k_rows, const c10::optional<at::Tensor>& v_rows) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4 && q.stride(3) == 1, "attention: query must be [B, H_q, Q, D] on the GPU");
  const int64_t B = q.size(0), Hq = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cent.size(0);
  TORCH_CHECK(Hq % Hkv == 0, "attention: H_q must be a multiple of H_kv");
  TORCH_CHECK(k_cent.is_contiguous() && v_cent.is_contiguous() && k_cent.scalar_type() == q.scalar_type() &&
              v_cent.scalar_type() == q.scalar_type(), "attention: centroids must be contiguous in the query dtype");
  TORCH_CHECK(k_cent.size(1) * k_cent.size(3) == D && v_cent.size(1) * v_cent.size(3) == D, "attention: centroid shapes");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.stride(1) == 1 && positions.size(1) >= S &&
              positions.size(0) == B, "attention: positions must be [B, >=S] int64");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() && inv_freq.numel() == D / 2 && inv_freq.is_cuda(),
              "attention: inv_freq must be [D/2] fp32 on the GPU");
  TORCH_CHECK(range.scalar_type() == at::kInt && range.is_contiguous() && range.numel() == B * Q * 2, "attention: range");
  check_device("attention", q.device(),
               {{"k_codes", &k_codes}, {"v_codes", &v_codes}, {"k_centroids", &k_cent}, {"v_centroids", &v_cent},
                {"positions", &positions}, {"inv_freq", &inv_freq}, {"cos", &opt(cos)}, {"sin", &opt(sin)},
                {"key ranges", &range}, {"win_k", &opt(win_k)}, {"win_v", &opt(win_v)}, {"new_k", &new_k},
                {"new_v", &new_v}, {"sink_k", &opt(sink_k)}, {"sink_v", &opt(sink_v)}, {"dev_start", &opt(dev_start)}});
  const at::cuda::OptionalCUDAGuard guard(q.device());
  const auto dt = q.scalar_type();
  at::Tensor out = at::empty({B, Q, Hq, D}, q.options());

  cq::AttnParams p{};
  p.q = q.data_ptr();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sq = q.stride(2);
  set_codes(p, k_codes, v_codes, k_cent, v_cent, k_bits, v_bits, S, "attention");
  p.k_tab = code_major_rows(k_rows, k_cent, "k_rows");
  p.v_tab = code_major_rows(v_rows, v_cent, "v_rows");
  p.positions = positions.data_ptr<int64_t>(); p.pos_sb = positions.stride(0);
  p.inv_freq = inv_freq.data_ptr<float>(); p.rope_scale = static_cast<float>(rope_scale);
  p.range = range.data_ptr<int>();
  p.win_k = fp_buf(win_k, D, dt); p.win_v = fp_buf(win_v, D, dt);
  p.new_k = fp_buf(new_k, D, dt); p.new_v = fp_buf(new_v, D, dt);
  p.sink_k = fp_buf(sink_k, D, dt); p.sink_v = fp_buf(sink_v, D, dt);
  p.win_len = win_k.has_value() && win_k->defined() ? win_k->size(2) : 0;
  p.n_sink = sink_k.has_value() && sink_k->defined() ? sink_k->size(2) : 0;
  p.window = window;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Q = Q; p.S = S; p.start = start; p.D = D;
  if (dev_start.has_value() && dev_start->defined()) {  // static decoding: the query's row on the device, a ring window
    TORCH_CHECK(dev_start->scalar_type() == at::kLong && dev_start->numel() >= 1 && Q == 1 && !prefill,
                "attention: dev_start must be int64 on the GPU, for one query per sequence (static decoding)");
    TORCH_CHECK(window == 0 || p.win_len == window, "attention: in static decoding the window ring must have window rows");
    p.dev_start = dev_start->data_ptr<int64_t>();
  }
  p.scaling = static_cast<float>(scaling);
  p.dtype = dtype_tag(q);
  p.out = out.data_ptr();
  p.o_sb = out.stride(0); p.o_sq = out.stride(1); p.o_sh = out.stride(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (prefill) {
    TORCH_CHECK(window == 0 && p.n_sink == 0, "attention: the prefill kernel takes no window or sinks");
    TORCH_CHECK(cos.has_value() && sin.has_value(), "attention: prefill needs the cos/sin table");
    set_cos_sin(p, *cos, *sin, S, D, "attention");
    check_cuda(cq::launch_prefill(p, stream), "prefill attention");
    return std::make_tuple(out, int64_t{2});
  }
  p.variant = static_cast<int>(variant);
  p.max_blocks = static_cast<int>(max_blocks);
  p.direct_max = static_cast<int>(direct_max);
  p.long_min = static_cast<int>(std::min<int64_t>(long_min, INT32_MAX));
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  check_cuda(cq::plan_decode(p, prop->multiProcessorCount, prop->sharedMemPerBlockOptin), "decode plan");
  if (p.nsplit > 1) {
    const int64_t rows = B * Hq * Q * p.nsplit;
    at::Tensor& ws = workspace(rows * (D + 2), q.device());
    p.ws_o = ws.data_ptr<float>();
    p.ws_ml = p.ws_o + rows * D;
  }
  if (p.mma && cq::mma_hist_floats(p) > 0)  // each block zeroes its own part
    p.ws_hist = workspace(static_cast<int64_t>(cq::mma_hist_floats(p)), q.device(), 1).data_ptr<float>();
  cudaStream_t fp_stream = nullptr;  // the full-precision split beside the code splits (cq::launch_decode)
  if (p.mma && p.has_fp && fp_side_stream) fp_stream = at::cuda::getStreamFromPool(true, q.device().index()).stream();
  check_cuda(cq::launch_decode(p, stream, fp_stream), "decode attention");
  const int64_t used = !p.mma ? 0 : p.variant == 2 ? 3 : cq::mma_group(p) > 1 ? 4 : p.mma_long ? 5 : 1;
  return std::make_tuple(out, used);
}

// Dense keys (RoPE from the fp32 cos/sin table [B or 1, >=S, D]) and values [B, H_kv, S, D] in the centroids' dtype,
// dequantized from the first S cached codes.
std::tuple<at::Tensor, at::Tensor> dequant(const at::Tensor& k_codes, const at::Tensor& v_codes, const at::Tensor& k_cent,
                                           const at::Tensor& v_cent, int64_t k_bits, int64_t v_bits,
                                           const at::Tensor& cos, const at::Tensor& sin, int64_t S) {
  TORCH_CHECK(k_codes.is_cuda() && k_codes.dim() == 4 && S >= 0, "dequant: code buffers");
  TORCH_CHECK(k_cent.is_contiguous() && v_cent.is_contiguous() && k_cent.scalar_type() == v_cent.scalar_type(),
              "dequant: centroids must be contiguous, one dtype");
  const int64_t B = k_codes.size(0), Hkv = k_cent.size(0), D = k_cent.size(1) * k_cent.size(3);
  TORCH_CHECK(v_cent.size(1) * v_cent.size(3) == D && k_codes.size(1) == Hkv && (D == 64 || D == 128), "dequant: shapes");
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == B, "dequant: cos/sin must be [B, >=S, D] fp32");
  cq::AttnParams p{};
  set_codes(p, k_codes, v_codes, k_cent, v_cent, k_bits, v_bits, S, "dequant");
  set_cos_sin(p, cos, sin, S, D, "dequant");
  check_device("dequant", k_codes.device(), {{"v_codes", &v_codes}, {"k_centroids", &k_cent}, {"v_centroids", &v_cent},
                                              {"cos", &cos}, {"sin", &sin}});
  const at::cuda::OptionalCUDAGuard guard(k_codes.device());
  at::Tensor kout = at::empty({B, Hkv, S, D}, k_cent.options());
  at::Tensor vout = at::empty({B, Hkv, S, D}, k_cent.options());
  p.B = B; p.Hkv = Hkv; p.S = S; p.D = D;
  p.dtype = dtype_tag(k_cent);
  check_cuda(cq::launch_dequant(p, kout.data_ptr(), vout.data_ptr(), at::cuda::getCurrentCUDAStream()), "dequant");
  return std::make_tuple(kout, vout);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cqtool CUDA kernels: CQ encode, decode attention (split-K) and prefill attention (tensor cores)";
  m.def("encode", &encode, "nearest-centroid encode + pack into the code buffer in place");
  m.def("encode_rows", &encode_rows, "encode, each new token into the code buffer row a device array names");
  m.def("encode_kv", &encode_kv, "encode a layer's keys and values in one launch");
  m.def("encode_kv_rows", &encode_kv_rows, "encode_kv into the code buffer rows a device array names (and, given, "
        "the window ring's rows in the same launch)", py::arg("k"), py::arg("k_cent"), py::arg("k_bits"),
        py::arg("k_codes"), py::arg("v"), py::arg("v_cent"), py::arg("v_bits"), py::arg("v_codes"), py::arg("rows"),
        py::arg("tiled_min"), py::arg("use_mma"), py::arg("ring_k") = py::none(), py::arg("ring_v") = py::none(),
        py::arg("win_k") = py::none(), py::arg("win_v") = py::none(), py::arg("ring_rows") = py::none());
  m.def("attention", &attention, "attention from CQ codes");
  m.def("dequant", &dequant, "dense RoPE'd keys and values from CQ codes (prefill through SDPA)");
}
