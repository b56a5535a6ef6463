"""Decode kernel choices at short shapes (CQ-8c8b, Llama-2-7b / Llama-3-8b shapes), as CUDA graphs (GPU time), beside
SDPA timed the same way: the tensor-core kernel (direct items of 512 tokens) against the CUDA-core kernel, GQA with and
without a 128-token window, and MHA. Usage: probe2.py [label]"""
import statistics
import sys

import torch

from cqtool import ops
from cqtool.bench_kernels import graph_times, synthetic_layer
from cqtool.config import QuantSpec

label = sys.argv[1] if len(sys.argv) > 1 else ""
spec = QuantSpec.parse("8c8b")
gqa = ((1, 512), (1, 2048), (1, 4096), (1, 8192), (2, 4096), (4, 1024), (4, 2048), (8, 512), (8, 1024), (16, 512),
       (32, 256), (64, 64), (128, 64), (2, 8192))
runs = [(8, 0, s) for s in gqa] + [(8, 128, s) for s in ((1, 512), (1, 4096), (1, 8192), (4, 2048), (8, 512),
                                                          (16, 512), (128, 64))]
runs += [(32, 0, s) for s in ((1, 512), (1, 4096), (8, 512), (32, 512), (128, 64))]
for kv, window, (B, S) in runs:
    q, view, kd, vd = synthetic_layer(B, S, kv, 128, spec, q_heads=32, window=window)
    sc = 128 ** -0.5
    sd = statistics.median(graph_times(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, kd, vd, scale=sc, enable_gqa=kv != 32), reps=7))
    out = []
    for kernel in ("tensor-core", "cuda-core", "auto"):
        ops.DECODE_KERNEL = kernel
        ops.cq_attention(q, view, None, sc)
        ran = ops.KERNEL_USED.get("attention")
        t = statistics.median(graph_times(lambda: ops.cq_attention(q, view, None, sc), reps=7))
        out.append(f"{kernel}[{ran}] {t * 1000:.1f}")
    ops.DECODE_KERNEL = "auto"
    print(f"{label} kv{kv} w{window} {B}x{S}: SDPA {sd * 1000:.1f} us; " + "; ".join(out), flush=True)
    del q, view, kd, vd
    torch.cuda.empty_cache()
