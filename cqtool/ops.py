"""One entry point per CQ operation: the CUDA kernel when the tensors are on a GPU and the extension loads, the
PyTorch reference otherwise. Every fallback is announced once per reason (never silently).

The kernels live in `kernels/` (one file per family, plus `binding.cpp`); they are compiled on first use with
torch's cpp_extension into ~/.cache/cqtool (or $TORCH_EXTENSIONS_DIR) and reused from there. Nothing is built,
and CUDA is not touched, at import.

    encode_into   x [B, H_kv, Q, D] -> codes[:, :, start:start+Q] ([B, H_kv, cap, R] uint8), in place
    cq_attention  query [B, H_q, Q, D] + CQView -> [B, Q, H_q, D]; decode (few queries):
                  tensor-core scores and a code histogram for the values (short GQA items: P.V straight from the
                  codes, MMA_DIRECT_MAX) where that kernel applies (DECODE_KERNEL),
                  the split-K CUDA-core kernel elsewhere; prefill (many queries): the layer dequantized once by a
                  kernel, then torch SDPA (PREFILL_KERNEL = "sdpa"), or the fused tensor-core prefill kernel
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from . import quant

log = logging.getLogger("cqtool")
_ANNOUNCED: set[tuple[str, str, str]] = set()
BACKEND_USED: dict[str, str] = {}
KERNEL_USED: dict[str, str] = {}  # which CUDA kernel the last call of an op ran (attention: values of _KERNEL_NAMES,
# "dequant+sdpa"; encode: encode_kernel_name)
KERNELS_RUN: set[str] = set()  # every attention kernel run since the caller last cleared it (evaluate records it)

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
SOURCES = ("binding.cpp", "encode.cu", "decode.cu", "decode_f16_d64.cu", "decode_f16_d128.cu", "decode_bf16_d64.cu",
           "decode_bf16_d128.cu", "decode_mma.cu", "prefill.cu", "dequant.cu")
HEADERS = ("kernels.h", "common.cuh", "decode.cuh")
KERNEL_CHANNELS = (1, 2, 4, 8, 16)
KERNEL_HEAD_DIMS = (64, 128)
MAX_KERNEL_BITS = 12
# more (query, head) pairs per kv head than this go to the prefill path (PREFILL_KERNEL)
DECODE_MAX_ROWS = 16
# Decode kernel, read at every call: "cuda-core" (kernels/decode.cuh, measured on the H100), "tensor-core" (kernels/
# decode_mma.cu where it applies: one query per query head, head_dim 128, 8-bit codes with c=8 or c=4 (CQ-4c8b) for K
# and V, any GQA ratio; a window/sinks run as one more split on CUDA cores; the CUDA-core kernel elsewhere) with 8 warps
# per block, or "tensor-core-16w", the same kernel with 16 warps per block for c=8 (twice the warps to hide latencies,
# 128 registers per thread), or "tensor-core-per-head", the 8-warp kernel with a block per query head also for GQA
# (each block gathers and rotates its kv head's keys again, where the grouped blocks share them among 2-4 heads: more
# work, but more blocks and a shorter chain per block, for short calls), or "dequant-sdpa": the layer's codes
# dequantized by the prefill's dequant kernel (keys rotated), then torch SDPA, as prefill does (reads the codes once
# but writes and reads dense K/V: for very short contexts at large batch, where the decode kernels' fixed cost per
# sequence and head dominates). "auto" (default):
# _decode_variant, and dequant-sdpa where decode_by_dequant says so.
DECODE_KERNELS = ("auto", "cuda-core", "tensor-core", "tensor-core-16w", "tensor-core-per-head", "dequant-sdpa")
DECODE_KERNEL = os.environ.get("CQTOOL_DECODE_KERNEL", "auto")
# MHA: the tensor-core kernel wherever it applies; its GPU time was lower than the CUDA-core kernel's at every shape
# measured but a tie at 1 x 64 (H100, Llama-2-7b shapes, 1 x 64 to 512 x 128 and 8 x 32K; e.g. 1 x 4K 22 vs 24 us,
# 128 x 64 215 vs 411 us, docs/raw/decode-tiny-gpu-time-h100-2026-11-27k.txt). GQA blocks of 2-4 query heads: from
# AUTO_MMA_TOKENS cached tokens per batch and AUTO_MMA_MIN_SEQ per sequence; below, the CUDA-core kernel, which shares
# each kv head's work among the whole group, was faster (Llama-3-8b shapes: 1 x 4K 27 vs 33 us; 512 x 256: 0.53 vs 0.62 ms; at 512 x 512
# the tensor-core kernel 0.63 vs 0.71). c = 8 GQA, whose short items take P.V straight from the codes (MMA_DIRECT_MAX):
# the tensor-core kernel from AUTO_MMA_DIRECT_TOKENS cached tokens per batch (splitting sequences into items of 512
# tokens), and for sequences of one tile from batch AUTO_MMA_SHORT_MIN_BATCH. Below that the CUDA-core kernel, faster
# since its tables are copied linearly (2026-11-28; H100, Llama-3-8b shapes, CUDA-graph time, tensor-core vs CUDA-core
# us, docs/raw/direct-value-table-2026-11-28/probe2-new.txt): 1 x 512 18.5 vs 17.1, 1 x 4K 24.3 vs 21.1, 4 x 1K 22.5
# vs 17.9, 8 x 512 18.9 vs 17.6; ties at 1 x 8K (26.6 both), 2 x 4K, 4 x 2K and 8 x 1K (within 0.4); the tensor-core
# kernel ahead at 16 x 512 19.4 vs 20.5, 32 x 256 22.4 vs 28.1, 64 x 64 31.1 vs 53.1, 128 x 64 57 vs 104, 2 x 8K 31.8
# vs 35.1. With a full-precision window or sinks (one more kernel, and the combine), MHA too only from
# AUTO_MMA_FP_TOKENS cached tokens per batch (window 128: 1 x 512 23 vs 17 us, 1 x 4K 29 vs 31 us, 8 x 512 37 vs 46
# us; docs/raw/decode-tiny-window-gpu-time-h100-2026-11-27l.txt); c = 8 GQA with a window of 128 from
# AUTO_MMA_DIRECT_TOKENS tokens per batch, short sequences too (2026-11-28, same probe: 1 x 512 23.3 vs 16.8, 1 x 4K
# 29.0 vs 29.5, 8 x 512 29.5 vs 29.6; 1 x 8K 31.5 vs 34.9, 4 x 2K 33.4 vs 39.7, 16 x 512 33.2 vs 40.2, 128 x 64 58.7
# vs 94.6).
AUTO_MMA_TOKENS = 16384
# auto: GQA decode through dequant-sdpa for sequences of at most AUTO_DEQUANT_MAX_SEQ_C4 tokens with c = 4 key codes
# (CQ-4c8b; AUTO_DEQUANT_MAX_SEQ for other codes, 0: not taken) in batches of at least AUTO_DEQUANT_MIN_TOKENS cached
# tokens, without a window or sinks. H100, Llama-3-8b shapes, us per layer, dequant-sdpa vs the kernel auto took
# before, two runs (docs/raw/attention-short-gqa-dequant-h100-2026-11-27x.json, attention-gqa-auto-dequant-...json):
# CQ-4c8b 128 x 64 61 / 60 vs 171 / 172, 128 x 128 111 / 109 vs 172 / 172, slower at 64 x 256 (110 vs 89), 8 x 128
# and 8 x 64 (fixed cost); CQ-8c8b 128 x 64 54 / 64 vs 66 / 67 (a tie in the second run: not taken), slower from 128
# tokens; MHA 128 x 64 164 vs 173 (CQ-8c8b), 204 vs 208 (CQ-4c8b): within run-to-run spread, not taken.
AUTO_DEQUANT_MAX_SEQ = 0
AUTO_DEQUANT_MAX_SEQ_C4 = 128
AUTO_DEQUANT_MIN_TOKENS = 8192
AUTO_MMA_DIRECT_TOKENS = 8192
AUTO_MMA_SHORT_MIN_BATCH = 16
# Encode kernels, read at every call. Below ENCODE_TILED_MIN token rows per launch (batch x new tokens): the row kernel
# (a block per row, lanes over the centroids). From it: the tensor-core kernel (ENCODE_MMA, c >= 8, 3 <= bits <=
# 10: x.c for 16 rows x 8 centroids per mma, the nearest on CUDA cores), else the tiled kernel (a block per 512 rows
# and code byte, the group's centroids in shared memory, two rows per thread; 2**bits x (c + 1) fp32 within 48 KB),
# else the row kernel. The row and tiled kernels write the same codes; the tensor-core one sums x.c in its own order,
# so a near-tie may go the other way (never to a farther centroid beyond fp32 rounding; tests/test_kernels.py). 0:
# always the row kernel. H100, one launch for K and V of a decode step (32 heads x 128, CQ-8c8b, bf16), row / tiled
# ms: 16 rows 0.014 / 0.029, 32 0.024 / 0.030, 64 0.043 / 0.040, 128 0.081 / 0.048, 512 0.294 / 0.088, 733 0.410 /
# 0.161 (docs/raw/probe-encode-batch.py); tensor-core 0.064 at 512 rows, 0.093 at 733, 1.78 ms for 8 x 2048 (tiled
# 2.62); with c = 4 it was no faster than the tiled kernel, hence c >= 8 (`cqtool bench encode`,
# docs/RESULTS_kernels.md).
ENCODE_TILED_MIN = 64
ENCODE_MMA = True
ENCODE_TILED_MAX_FLOATS = 12288  # kTiledMaxFloats in kernels/encode.cu
MMA_TILE = 512  # tokens per tile of the tensor-core decode kernel (kTile in kernels/decode_mma.cu)
AUTO_MMA_FP_TOKENS = 4096
AUTO_MMA_MIN_SEQ = 512
# CQ-4c8b (c = 4) GQA blocks take 2 query heads, the CUDA-core kernel the whole group: the tensor-core kernel was faster
# only at long contexts (H100, Llama-3-8b shapes: 8 x 32K 0.331 vs 0.394 ms, 1 x 32K 0.067 vs 0.072, 32 x 8K 0.384 vs
# 0.406 (2026-11-27, docs/raw/attention-gqa-c4-h100-2026-11-27u.json; 0.387 vs 0.404 in an earlier run); 128 x 512
# 0.303 vs 0.224; docs/RESULTS_kernels.md). Since the CUDA-core kernel copies its tables linearly (2026-11-28) it wins
# up to 32K tokens per batch and ties at 64K, so the tensor-core one takes c = 4 GQA from AUTO_MMA_TOKENS_C4_GQA tokens
# (CUDA-graph us, tensor-core vs CUDA-core, docs/raw/direct-value-table-2026-11-28/probe-c4.txt: 1 x 16K 43.1 vs 38.1,
# 2 x 8K 40.7 vs 36.7, 1 x 32K 65.6 vs 61.6; 2 x 32K 104.2 vs 104.4, 4 x 16K 103.7 vs 103.3, 16 x 8K 188.9 vs 189.9;
# 8 x 8K 98.2 vs 102.7, 4 x 32K 178.4 vs 191.8, 8 x 32K 321.5 vs 370.7)
AUTO_MMA_MIN_SEQ_C4_GQA = 8192
AUTO_MMA_TOKENS_C4_GQA = 65536
AUTO_MMA_KERNEL = "tensor-core"
# auto, GQA: "tensor-core-per-head" (a block per query head, each gathering its kv head's keys) for small batches of
# short sequences: at most AUTO_PER_HEAD_MAX_BATCH sequences and AUTO_PER_HEAD_MAX_TOKENS cached tokens per batch (c = 4
# key codes: the _C4 limits). There a call's time is its blocks' latency, not their work, and four times the blocks
# (each with the shorter chain of one head) beat both the grouped blocks and the CUDA-core kernel. H100, Llama-3-8b
# shapes, CUDA-graph time, per-head / grouped tensor-core / CUDA-core us (2026-11-28,
# docs/raw/direct-value-table-2026-11-28/probe3-v3.txt): CQ-8c8b 1 x 512 11.3 / 18.0 / 16.6, 1 x 4K 17.0 / 23.9 /
# 20.7, 1 x 16K 30.3 / 33.4 / 36.7, 4 x 2K 18.6 / 23.2 / 22.9, 2 x 8K 30.3 / 31.8 / 35.1; ties at 8 x 512 (17.4 / 18.4 /
# 17.3) and 8 x 1K; slower at 16 x 512 (29.0 / 18.8 / 20.2); window 128: 1 x 512 14.1 / 23.8 / 16.9, 1 x 4K 23.6 /
# 29.4 / 29.6, 8 x 512 26.1 / 29.8 / 29.5, 1 x 8K 27.8 / 31.5 / 34.6. CQ-4c8b: 1 x 512 12.5 / 17.9 / 16.9, 1 x 4K
# 19.6 / 27.2 / 20.9; slower than the CUDA-core kernel at 8 x 512 (20.4 vs 17.7), 1 x 8K (27.2 vs 26.6), 4 x 2K.
AUTO_PER_HEAD_MAX_BATCH = 8
AUTO_PER_HEAD_MAX_TOKENS = 16384
AUTO_PER_HEAD_MAX_BATCH_C4 = 1
AUTO_PER_HEAD_MAX_TOKENS_C4 = 4096
# Tensor-core decode blocks per launch, read at every call: 0 (default) = one per SM, each block looping over a
# contiguous run of the (kv-head-major) items (query heads, batch row, split) so that its key tables stay loaded;
# tests set a few to make each block run many items.
MMA_MAX_BLOCKS = 0
# Tensor-core decode, c = 8 GQA blocks: items (a sequence's code split, for 2-4 query heads) of one tile with at most
# this many tokens take P.V straight from their value codes (a centroid load per token and group from the kv head's
# value table, copied into the shared memory the histograms would use; shared by the heads) instead of through a code
# histogram, whose fixed cost per item (clearing, flushing to global memory, multiplying 256 codes x 16 groups bins)
# short items pay whatever their length. Sequences that the kernel splits go into items of min(MMA_DIRECT_MAX, 512)
# tokens (from 128; below, splits of 1024 and no split into direct items). Read at every call; 0 turns it off. (MHA
# and c = 4 blocks always use the histogram: the direct product was slower there; docs/RESULTS_kernels.md.)
MMA_DIRECT_MAX = 512
# Tensor-core decode, CQ-8c8b MHA blocks (8 warps): items (a sequence's code split for one head) of at least this many
# tokens run the block's LONG build ("decode-mma-long"), others its short-item build ("decode-mma"). They differ only
# in schedule: the short-item build skips per-item work (the first flush, the empty m-tiles of a partial tile, the
# last flush's clearing, integer divisions), which moves ptxas's schedule of the tile loop; LONG keeps the loop
# measured fastest at 8 x 32K. Kernel GPU time on the H100, short / LONG: 128 x 64 0.77, 512 x 512 0.84, 512 x 2304
# 0.92, 256 x 4096 0.97, 32 x 8192 0.99, 32 x 16384 0.995, 8 x 32768 1.008 (docs/RESULTS_kernels.md). Read at every
# call; 0 always takes LONG.
MMA_LONG_MIN = 32768
# The tensor-core decode's full-precision split (window and sinks) on a second stream, forked and joined by events,
# beside the code splits rather than after them (read at every call; CQTOOL_FP_SPLIT_STREAM=0: one stream). Not in
# static decoding: H100, window 128, eager calls 1 x 32K 0.068 -> 0.063 ms and 8 x 32K 0.311 -> 0.303, but a batch-1
# graph step at a 32K prompt 10.32 -> 10.47 ms (2K: 8.98 both; docs/RESULTS_kernels.md).
FP_SPLIT_STREAM = os.environ.get("CQTOOL_FP_SPLIT_STREAM", "1") != "0"
# Static decoding with a window: the encode launch also writes the new tokens' full-precision keys and values into the
# window ring (one more slice of its blocks, kernels/encode.cu ring_copy) instead of two index_copy_ launches per layer
# (read at every call; CQTOOL_RING_IN_ENCODE=0: index_copy_, for comparisons).
RING_IN_ENCODE = os.environ.get("CQTOOL_RING_IN_ENCODE", "1") != "0"
_VARIANTS = {"cuda-core": 0, "tensor-core": 1, "tensor-core-16w": 2, "tensor-core-per-head": 3}
_KERNEL_NAMES = {0: "decode", 1: "decode-mma", 2: "prefill", 3: "decode-mma16", 4: "decode-mma-gqa",
                 5: "decode-mma-long"}
# Prefill (many queries), read at every call: "sdpa" (default) dequantizes the layer once (kernels/dequant.cu:
# centroid lookup + RoPE) and runs torch SDPA, FlashAttention where it applies (with a window or sinks: the
# full-precision keys appended, one mask choosing each key's source); "tensor-core" is the fused kernel
# (kernels/prefill.cu) that dequantizes key tiles per block of 64 queries, never writing them to memory (8-10x slower
# than SDPA on the H100 at Llama-2-7b shapes: docs/RESULTS_kernels.md; no window or sinks: those run the decode
# kernel in query chunks).
PREFILL_KERNELS = ("sdpa", "tensor-core")
PREFILL_KERNEL = os.environ.get("CQTOOL_PREFILL_KERNEL", "sdpa")
_build_error: str | None = None


def _note(op: str, backend: str, why: str = "") -> None:
    BACKEND_USED[op] = backend
    if (op, backend, why) not in _ANNOUNCED:
        _ANNOUNCED.add((op, backend, why))
        level = logging.INFO if backend == "cuda" else logging.WARNING
        log.log(level, "cqtool: %s runs on the %s path%s", op, backend, f" ({why})" if why else "")


def build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "cqtool") / "cqtool_kernels"


@functools.cache
def get_module():
    """The compiled extension (built on first call, then loaded from the build cache), or None with the reason
    kept for `kernel_status()`."""
    global _build_error
    if not torch.cuda.is_available():
        _build_error = "no CUDA device is available"
        return None
    if torch.version.cuda is None:
        _build_error = f"this torch ({torch.__version__}) has no CUDA support"
        return None
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        _build_error = f"GPU compute capability {major}.{minor}: the kernels need 8.0 or newer (cp.async, bf16 mma)"
        return None
    missing = [f for f in SOURCES + HEADERS if not (KERNEL_DIR / f).is_file()]
    if missing:
        _build_error = f"kernel sources missing from {KERNEL_DIR}: {', '.join(missing)}"
        return None
    try:
        from torch.utils.cpp_extension import load

        d = build_dir()
        d.mkdir(parents=True, exist_ok=True)
        arch = f"{major}{minor}"
        return load(
            name="cqtool_kernels",
            sources=[str(KERNEL_DIR / f) for f in SOURCES],
            build_directory=str(d),
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"],
            extra_include_paths=[str(KERNEL_DIR)],
            verbose=bool(os.environ.get("CQTOOL_VERBOSE_BUILD")),
        )
    except Exception as e:  # a compiler or loader failure of any kind: fall back and say why
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        _build_error = f"building the CUDA extension failed: {type(e).__name__}: {lines[-1] if lines else ''}"
        return None


def kernel_status() -> dict:
    """Whether the CUDA extension is loaded (building it on first call when a GPU is present) and, if not, why."""
    mod = get_module() if torch.cuda.is_available() else None
    reason = None if mod is not None else (_build_error or "no CUDA device is available")
    return {"available": mod is not None, "reason": reason, "build_dir": str(build_dir()),
            "sources": str(KERNEL_DIR), "backend_used": dict(BACKEND_USED), "kernel_used": dict(KERNEL_USED)}


def _module_or_reason() -> tuple[object | None, str]:
    mod = get_module()
    return (mod, "") if mod is not None else (None, f"CUDA extension unavailable: {_build_error}")


def _spec_reason(D: int, c: int, bits: int, what: str) -> str:
    if c not in KERNEL_CHANNELS:
        return f"{what} channels per group c={c} (kernels take {list(KERNEL_CHANNELS)})"
    if not 1 <= bits <= MAX_KERNEL_BITS:
        return f"{what} code bits b={bits} (kernels take 1..{MAX_KERNEL_BITS})"
    return ""


def encode_kernel_name(rows: int, c: int, *bits: int) -> str:
    """Which encode kernel a launch of `rows` token rows (batch x new tokens) with c channels per group and these code
    bits runs: the rule of kernels/encode.cu's launch_t, for the record (ops.KERNEL_USED["encode"])."""
    if ENCODE_TILED_MIN <= 0 or rows < ENCODE_TILED_MIN:
        return "encode-row"
    if ENCODE_MMA and c >= 8 and all(3 <= b and (1 << b) * 36 + 4096 <= 48 * 1024 for b in bits):
        return "encode-mma"
    return "encode-tiled" if all((1 << b) * (c + 1) <= ENCODE_TILED_MAX_FLOATS for b in bits) else "encode-row"


def _encode_reason(x: torch.Tensor, centroids: torch.Tensor, bits: int, codes: torch.Tensor) -> str:
    """Why the encode kernel cannot take this operand ("" when it can, the extension aside)."""
    from . import attention

    if attention.FORCE_REFERENCE:
        return "forced by --backend reference"
    if not x.is_cuda:
        return "tensors on CPU"
    if x.dtype not in (torch.float16, torch.bfloat16) or centroids.dtype != x.dtype:
        return f"dtype {x.dtype} / centroids {centroids.dtype} (kernels take fp16 or bf16, both the same)"
    if not codes.is_contiguous():
        return "code buffer is not contiguous"
    return _spec_reason(x.shape[-1], centroids.shape[-1], bits, "")


def encode_into(x: torch.Tensor, centroids: torch.Tensor, bits: int, codes: torch.Tensor, start: int,
                rows: torch.Tensor | None = None) -> None:
    """Encode x [B, H_kv, Q, D] and write packed codes into codes[:, :, start:start+Q] ([B, H_kv, cap, R] uint8), or,
    with `rows` (int64 [Q] on x's device), token t into row rows[t] (static decoding: the rows live on the device).
    `--backend reference` (attention.FORCE_REFERENCE) takes the reference here too."""
    Q = x.shape[2]
    why = _encode_reason(x, centroids, bits, codes)
    if not why:
        mod, why = _module_or_reason()
        if mod is not None:
            xs = x if x.stride(-1) == 1 else x.contiguous()
            if rows is None:
                mod.encode(xs, centroids.contiguous(), int(bits), codes, int(start), int(ENCODE_TILED_MIN),
                           bool(ENCODE_MMA))
            else:
                mod.encode_rows(xs, centroids.contiguous(), int(bits), codes, rows, int(ENCODE_TILED_MIN),
                                bool(ENCODE_MMA))
            KERNEL_USED["encode"] = encode_kernel_name(x.shape[0] * Q, centroids.shape[-1], bits)
            _note("encode", "cuda")
            return
    _note("encode", "reference", why)
    new = quant.pack(quant.encode(x, centroids), bits)
    if rows is None:
        codes[:, :, start : start + Q] = new
    else:
        codes.index_copy_(2, rows, new)


def _ring_in_launch(ring, k: torch.Tensor) -> bool:
    """Whether the encode launch can also write the window ring's rows (ring_copy in kernels/encode.cu): one 16-bit
    dtype for each source and its window, everything on the keys' GPU, last dims contiguous."""
    k_full, v_full, win_k, win_v, slots = ring
    pairs = ((k_full, win_k), (v_full, win_v))
    return (slots.device == k.device and slots.dtype == torch.int64
            and all(a.device == k.device and b.device == k.device and a.dtype == b.dtype and a.element_size() == 2
                    and a.shape[:3] == k.shape[:3] and a.shape[-1] == b.shape[-1] and a.stride(-1) == 1
                    and b.stride(-1) == 1 for a, b in pairs))


def encode_kv_into(k: torch.Tensor, k_centroids: torch.Tensor, k_bits: int, k_codes: torch.Tensor, v: torch.Tensor,
                   v_centroids: torch.Tensor, v_bits: int, v_codes: torch.Tensor, start: int,
                   rows: torch.Tensor | None = None, ring: tuple | None = None) -> None:
    """encode_into for a layer's keys and for its values, in one kernel launch where both take the kernel and share
    shape, channels per group and dtype (one launch less per layer and step, and the values' blocks run beside the
    keys'); otherwise the two encode_into calls, each of which says which backend ran and why.

    ring = (keys after RoPE, values, win_k, win_v, slots) (static decoding's window, with `rows`): token t's keys and
    values also go to row slots[t] of win_k / win_v, written by the same launch where it can (one more slice of its
    blocks: two launches less per layer and step), else by `index_copy_`; ops.KERNEL_USED["ring"] says which."""
    one = (k.shape == v.shape and k.device == v.device and k.dtype == v.dtype
           and k_centroids.shape[-1] == v_centroids.shape[-1]
           and not _encode_reason(k, k_centroids, k_bits, k_codes)
           and not _encode_reason(v, v_centroids, v_bits, v_codes))
    mod = _module_or_reason()[0] if one else None
    if ring is not None and rows is None:
        raise ValueError("encode_kv_into: a window ring is written only with device-side rows (static decoding)")
    if mod is None:
        encode_into(k, k_centroids, k_bits, k_codes, start, rows=rows)
        encode_into(v, v_centroids, v_bits, v_codes, start, rows=rows)
        _ring_copy(ring)
        return
    ks = k if k.stride(-1) == 1 else k.contiguous()
    vs = v if v.stride(-1) == 1 else v.contiguous()
    if rows is None:
        mod.encode_kv(ks, k_centroids.contiguous(), int(k_bits), k_codes, vs, v_centroids.contiguous(), int(v_bits),
                      v_codes, int(start), int(ENCODE_TILED_MIN), bool(ENCODE_MMA))
    else:
        in_launch = ring is not None and RING_IN_ENCODE and _ring_in_launch(ring, k)
        mod.encode_kv_rows(ks, k_centroids.contiguous(), int(k_bits), k_codes, vs, v_centroids.contiguous(),
                           int(v_bits), v_codes, rows, int(ENCODE_TILED_MIN), bool(ENCODE_MMA),
                           *(ring if in_launch else ()))
        if in_launch:
            KERNEL_USED["ring"] = "encode launch"
        else:
            _ring_copy(ring)
    KERNEL_USED["encode"] = encode_kernel_name(k.shape[0] * k.shape[2], k_centroids.shape[-1], k_bits, v_bits)
    _note("encode", "cuda")


def _ring_copy(ring) -> None:
    """The window ring's rows by index_copy_ (the reference path, and launches that cannot take them)."""
    if ring is None:
        return
    k_full, v_full, win_k, win_v, slots = ring
    win_k.index_copy_(2, slots, k_full.to(win_k.dtype))
    win_v.index_copy_(2, slots, v_full.to(win_v.dtype))
    KERNEL_USED["ring"] = "index_copy_"


# ---- attention

_range_memo: list = [None, None, None]  # [mask object (kept alive so its id cannot be reused), key, ranges]
# [source tensor (kept alive so its id cannot be reused), device, its copy there] (_device_copy)
_inv_freq_memo: list = [None, None, None]
_positions_memo: list = [None, None, None]


def key_ranges(attention_mask, B: int, Q: int, S: int, start: int, device) -> torch.Tensor:
    """Allowed keys of every query as one interval: int32 [B, Q, 2] = [lo, hi).

    transformers' masks for causal LMs (left padding, causal) allow a contiguous range of keys per query; None
    means causal without padding. Memoised on the mask object: all layers of a forward share one mask.
    """
    # the mask's version too: a static decode (graphs.StaticDecoder) passes one mask, written in place every step;
    # and the stream: micro-batches on their own streams (pipeline.MicroBatches) must not read each other's ranges
    stream = torch.cuda.current_stream(device).stream_id if torch.device(device).type == "cuda" else None
    key = (B, Q, S, start, str(device), getattr(attention_mask, "_version", None), stream)
    if _range_memo[2] is not None and _range_memo[0] is attention_mask and _range_memo[1] == key:
        return _range_memo[2]
    if attention_mask is None:
        hi = torch.arange(start + 1, start + Q + 1, device=device, dtype=torch.int32)
        r = torch.stack([torch.zeros_like(hi), hi], -1).expand(B, Q, 2).contiguous()
    else:
        m = attention_mask[..., :S]
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m.bool()
        m = m[:, 0].expand(B, Q, S)  # [B, Q, S]
        lo = m.to(torch.uint8).argmax(-1)
        hi = S - m.flip(-1).to(torch.uint8).argmax(-1)
        anyk = m.any(-1)
        r = torch.stack([torch.where(anyk, lo, 0), torch.where(anyk, hi, 0)], -1).to(torch.int32).contiguous()
    _range_memo[:] = [attention_mask, key, r]
    return r


def _device_copy(memo: list, t: torch.Tensor, device, make) -> torch.Tensor:
    """make(t) for `device`, remembered for the last (tensor object, its version, device) asked: the layers of a step
    that run on one GPU share one copy (the version: a static cache writes its positions in place)."""
    key = (str(device), t._version)
    if memo[0] is not t or memo[1] != key:
        memo[:] = [t, key, make(t)]
    return memo[2]


def _device_inv_freq(cache, device) -> torch.Tensor:
    if hasattr(cache, "inv_freq_on"):  # a CQCache: one copy per GPU
        return cache.inv_freq_on(device)
    return _device_copy(_inv_freq_memo, cache.inv_freq, device,
                        lambda t: t.to(device=device, dtype=torch.float32).contiguous())


def _device_positions(cache, device) -> torch.Tensor:
    """The cache's token positions [B, S] on `device`. They live where the model's first layer runs; with a model
    spread over GPUs (device_map) the later layers' kernels read a copy on their own GPU: CQCache.on_device (once per
    step, or the copy a replayed CUDA graph refreshes); for other caches (tests' stand-ins) the last copy made."""
    if hasattr(cache, "on_device"):
        return cache.on_device("positions", device)
    pos = cache.positions
    if pos.device == torch.device(device):
        return pos
    return _device_copy(_positions_memo, pos, device, lambda t: t.to(device))


CODE_MAJOR_MAX_BITS = 8  # larger tables do not fit shared memory: the CUDA-core kernel gathers from the centroids


def code_major_rows(layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The layer's key and value centroids code-major, [H_kv, 2**bits, D] contiguous (None for more than
    CODE_MAJOR_MAX_BITS bits): the rows of the decode kernels' shared-memory tables, which a block then copies linearly
    (from the group-major centroids it gathered 16-byte pieces 4 KB apart, 3.7 us of a short item's 15.5 us on the
    H100; docs/RESULTS_kernels.md). Made once per centroid tensors (and their versions) and kept on the layer; not
    kept when made inside a CUDA graph capture (the graph then makes them at every replay: decoders warm up eagerly
    first)."""
    k, v = layer.k_centroids, layer.v_centroids
    key = (k._version, v._version)  # centroids written in place make new rows too
    memo = getattr(layer, "_code_major", None)
    if memo is not None and memo[0] is k and memo[1] is v and memo[2] == key:
        return memo[3], memo[4]
    rows = tuple(c.transpose(1, 2).reshape(c.shape[0], c.shape[2], -1).contiguous() if bits <= CODE_MAJOR_MAX_BITS
                 else None for c, bits in ((k, layer.k_bits), (v, layer.v_bits)))
    if not (k.is_cuda and torch.cuda.is_current_stream_capturing()):
        layer._code_major = (k, v, key, *rows)
    return rows


def _attention_reason(query: torch.Tensor, layer) -> str:
    if not query.is_cuda:
        return "tensors on CPU"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {query.dtype} (kernels take fp16 or bf16)"
    if layer.k_centroids.dtype != query.dtype or layer.v_centroids.dtype != query.dtype:
        return "centroid dtype differs from the query dtype"
    D = query.shape[-1]
    if D not in KERNEL_HEAD_DIMS:
        return f"head_dim {D} (kernels take {list(KERNEL_HEAD_DIMS)})"
    if query.shape[1] % layer.k_centroids.shape[0]:
        return "query heads are not a multiple of kv heads"
    return _spec_reason(D, layer.k_centroids.shape[-1], layer.k_bits, "key") or \
        _spec_reason(D, layer.v_centroids.shape[-1], layer.v_bits, "value")


def _ran(kernel: str, why: str) -> None:
    KERNEL_USED["attention"] = kernel
    KERNELS_RUN.add(kernel)
    _note("attention", "cuda", why)


def _prefill_sdpa(mod, query, view, attention_mask, scaling: float, cos, sin) -> torch.Tensor:
    """Prefill: the layer's codes dequantized once (keys rotated) by the CUDA kernel, then torch SDPA.
    query [B, H_q, Q, D] -> [B, Q, H_q, D]. Queries with no allowed key get zeros, as in the reference."""
    layer = view.layer
    B, Hq, Q, D = query.shape
    S = view.length
    k, v = mod.dequant(layer.k_codes, layer.v_codes, layer.k_centroids, layer.v_centroids, int(layer.k_bits),
                       int(layer.v_bits), cos, sin, int(S))
    gqa = Hq != k.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cfg = layer.config
    if attention_mask is None and view.start == 0 and Q == S and not (cfg.window or cfg.sinks):
        out = sdpa(query, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2)
    if attention_mask is None and Q == 1 and view.start == S - 1 and not (cfg.window or cfg.sinks):
        return sdpa(query, k, v, scale=scaling, enable_gqa=gqa).transpose(1, 2)  # one query sees every key
    r = key_ranges(attention_mask, B, Q, S, view.start, query.device)  # [B, Q, 2]
    j = torch.arange(S, device=query.device)
    allowed = (j >= r[..., :1]) & (j < r[..., 1:])  # [B, Q, S]
    if cfg.window or cfg.sinks:
        k, v, allowed = _with_full_precision(view, k, v, allowed)
    out = sdpa(query, k, v, attn_mask=allowed.unsqueeze(1), scale=scaling, enable_gqa=gqa)
    empty = (r[..., 0] >= r[..., 1]).view(B, 1, Q, 1)
    return out.masked_fill(empty, 0.0).transpose(1, 2)


def _with_full_precision(view, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor):
    """Prefill with a window / sinks as one SDPA call: the full-precision keys and values (window and new tokens,
    sinks) appended after the dequantized ones, and the mask choosing, per (query, key position), the source that
    attention.attend_codes_reference uses: the sink where one is held, else the full-precision token inside the window
    where it is available, else the codes. k, v [B, H_kv, S, D]; allowed [B, Q, S] -> the longer k, v, mask."""
    from .attention import fp_region, full_precision_pairs

    layer, cfg = view.layer, view.layer.config
    S, Q, dev = k.shape[2], allowed.shape[1], k.device
    lo, fk, fv = fp_region(view, S)
    j = torch.arange(S, device=dev).view(1, S)
    use_fp = full_precision_pairs(view, Q, S, dev)  # [Q, S]
    n = layer.sink_k.shape[2] if cfg.sinks and layer.sink_k is not None else 0
    sink = j < n
    fp_here = use_fp & ~sink & (j >= lo)
    keys, values = [k, fk], [v, fv]
    masks = [allowed & ~(use_fp & (sink | (j >= lo))), (allowed & fp_here)[..., lo:]]
    if n:
        keys.append(layer.sink_k)
        values.append(layer.sink_v)
        masks.append((allowed & use_fp & sink)[..., :n])
    return torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, 2)


def decode_by_dequant(B: int, S: int, group: int = 1, c: int = 8, fp: bool = False) -> bool:
    """Whether decode queries over S cached tokens (batch B, `group` query heads per kv head, c channels per key code,
    `fp`: a full-precision window or sinks) go through dequant-sdpa (DECODE_KERNELS; auto: AUTO_DEQUANT_*)."""
    if DECODE_KERNEL != "auto":
        return DECODE_KERNEL == "dequant-sdpa"
    max_seq = AUTO_DEQUANT_MAX_SEQ_C4 if c == 4 else AUTO_DEQUANT_MAX_SEQ
    return group >= 2 and not fp and S <= max_seq and B * S >= AUTO_DEQUANT_MIN_TOKENS


def _decode_variant(B: int, S: int, group: int = 1, c: int = 8, fp: bool = False) -> int:
    """The decode kernel request passed to the extension (0: CUDA cores, 1/2: tensor cores with 8/16 warps, 3: tensor
    cores with 8 warps and a block per query head). auto: for GQA, 3 for small batches of short sequences
    (AUTO_PER_HEAD_*); the tensor-core kernel for MHA (with a full-precision window or sinks, `fp`, from
    AUTO_MMA_FP_TOKENS cached tokens per batch); for GQA (whose query heads it takes 2-4 per block, 2 with c = 4 codes)
    from AUTO_MMA_TOKENS (c = 4: AUTO_MMA_TOKENS_C4_GQA) cached tokens per batch and AUTO_MMA_MIN_SEQ (c = 4:
    AUTO_MMA_MIN_SEQ_C4_GQA) per sequence, and with c = 8 (whose short items take P.V straight from the codes) also
    from AUTO_MMA_DIRECT_TOKENS tokens per batch (items of 512 tokens) and, without `fp`, for sequences of at most
    MMA_DIRECT_MAX tokens from batch AUTO_MMA_SHORT_MIN_BATCH (H100, docs/RESULTS_kernels.md). The extension runs the
    CUDA-core kernel wherever the tensor-core one does not apply, and says which ran."""
    if DECODE_KERNEL == "auto":
        if group < 2:
            ok = not fp or B * S >= AUTO_MMA_FP_TOKENS
        else:
            most_b, most_t = ((AUTO_PER_HEAD_MAX_BATCH_C4, AUTO_PER_HEAD_MAX_TOKENS_C4) if c == 4
                              else (AUTO_PER_HEAD_MAX_BATCH, AUTO_PER_HEAD_MAX_TOKENS))
            if B <= most_b and B * S <= most_t:
                return _VARIANTS["tensor-core-per-head"]
            min_seq = AUTO_MMA_MIN_SEQ_C4_GQA if c == 4 else AUTO_MMA_MIN_SEQ
            min_tokens = AUTO_MMA_TOKENS_C4_GQA if c == 4 else AUTO_MMA_TOKENS
            ok = B * S >= min_tokens and S >= min_seq
            if c == 8 and MMA_DIRECT_MAX > 0:
                # sequences short enough for P.V straight from the codes (one item of one tile) from batch
                # AUTO_MMA_SHORT_MIN_BATCH; they (with a window or sinks too), and any sequence once the kernel may
                # split it into such items of 512 tokens, from AUTO_MMA_DIRECT_TOKENS tokens per batch
                short = S <= min(MMA_DIRECT_MAX, MMA_TILE)
                ok = ok or (short and not fp and B >= AUTO_MMA_SHORT_MIN_BATCH)
                ok = ok or ((short or MMA_DIRECT_MAX >= MMA_TILE) and B * S >= AUTO_MMA_DIRECT_TOKENS)
        return _VARIANTS[AUTO_MMA_KERNEL] if ok else 0
    return _VARIANTS.get(DECODE_KERNEL, 0)  # dequant-sdpa: decode never reaches the kernels; prefill ignores this


def cq_attention(query: torch.Tensor, view, attention_mask, scaling: float) -> torch.Tensor:
    """Attention from codes for the new queries of one layer. query [B, H_q, Q, D] -> [B, Q, H_q, D]."""
    layer = view.layer
    why = _attention_reason(query, layer)
    mod = None
    if not why:
        mod, why = _module_or_reason()
    if mod is None:
        from .attention import attend_codes_reference

        _note("attention", "reference", why)
        return attend_codes_reference(query, view, attention_mask, scaling)
    cache, cfg = layer.parent, layer.config
    B, Hq, Q, D = query.shape
    S = view.length
    group, c = Hq // layer.k_centroids.shape[0], layer.k_centroids.shape[-1]
    sinks = cfg.sinks and layer.sink_k is not None
    fp = bool(cfg.window or sinks)
    if DECODE_KERNEL not in DECODE_KERNELS:
        raise ValueError(f"ops.DECODE_KERNEL must be one of {list(DECODE_KERNELS)}, got {DECODE_KERNEL!r}")
    if PREFILL_KERNEL not in PREFILL_KERNELS:
        raise ValueError(f"ops.PREFILL_KERNEL must be one of {list(PREFILL_KERNELS)}, got {PREFILL_KERNEL!r}")
    # static decoding (a CUDA graph's step) with a window or sinks: the decode kernels, which read the query's row
    # from the device and the window from its ring (dequant-sdpa and prefill take host-side positions)
    ring = view.rows is not None and fp
    # many queries: prefill (with a window or sinks only through SDPA; the fused prefill kernel takes neither)
    prefill = not ring and group * Q > DECODE_MAX_ROWS and (PREFILL_KERNEL == "sdpa" or not (cfg.window or cfg.sinks))
    # the layer dequantized by a kernel, then torch SDPA: prefill by default, decode where decode_by_dequant says so
    dequant = not ring and (PREFILL_KERNEL == "sdpa" if prefill else decode_by_dequant(B, S, group, c, fp))
    cos, sin = cache.cos_sin(S, query.device) if prefill or dequant else (None, None)
    if dequant:
        out = _prefill_sdpa(mod, query, view, attention_mask, scaling, cos, sin)
        _ran("dequant+sdpa", f"dequant kernel + torch SDPA for {'prefill' if prefill else 'decode'}")
        return out
    q = query if query.stride(-1) == 1 else query.contiguous()
    out, used = mod.attention(
        q, layer.k_codes, layer.v_codes, layer.k_centroids, layer.v_centroids, int(layer.k_bits), int(layer.v_bits),
        _device_positions(cache, query.device), _device_inv_freq(cache, query.device), float(cache.rope_scale), cos, sin,
        key_ranges(attention_mask, B, Q, S, view.start, query.device),
        view.win_k if cfg.window else None, view.win_v if cfg.window else None, view.new_k, view.new_v,
        layer.sink_k if sinks else None, layer.sink_v if sinks else None,
        int(cfg.window), int(view.start), int(S), float(scaling), bool(prefill),
        _decode_variant(B, S, group, c, fp),
        # the LONG build for MHA only (a GQA group's per-head blocks, variant 3, keep the short-item build the tests
        # cover for them)
        int(MMA_MAX_BLOCKS), int(MMA_DIRECT_MAX), int(MMA_LONG_MIN) if group == 1 else 1 << 30,
        view.rows if ring else None,
        bool(FP_SPLIT_STREAM and not ring), *((None, None) if prefill else code_major_rows(layer)))
    _ran(_KERNEL_NAMES[used], f"{_KERNEL_NAMES[used]} kernel")
    return out
