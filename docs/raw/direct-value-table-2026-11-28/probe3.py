"""GQA decode at short shapes (Llama-3-8b: 32 query heads, 8 kv heads): each kernel choice as CUDA graphs (GPU time),
SDPA the same way; CQ-8c8b (with and without a 128-token window) and CQ-4c8b. Usage: probe3.py [label]"""
import statistics
import sys

import torch

from cqtool import ops
from cqtool.bench_kernels import graph_times, synthetic_layer
from cqtool.config import QuantSpec

label = sys.argv[1] if len(sys.argv) > 1 else ""
short = ((1, 512), (1, 1024), (1, 2048), (1, 4096), (1, 8192), (2, 4096), (4, 1024), (4, 2048), (8, 512), (8, 1024),
         (16, 512), (32, 256), (1, 16384), (2, 8192))
runs = [("8c8b", 0, s) for s in short] + [("8c8b", 128, s) for s in ((1, 512), (1, 4096), (8, 512), (1, 8192))]
runs += [("4c8b", 0, s) for s in ((1, 512), (1, 4096), (8, 512), (1, 8192), (4, 2048), (1, 16384), (2, 8192),
                                  (1, 32768))]
choices = ("tensor-core", "tensor-core-per-head", "cuda-core", "auto")
for spec_name, window, (B, S) in runs:
    spec = QuantSpec.parse(spec_name)
    q, view, kd, vd = synthetic_layer(B, S, 8, 128, spec, q_heads=32, window=window)
    sc = 128 ** -0.5
    ref = torch.nn.functional.scaled_dot_product_attention(q, kd, vd, scale=sc, enable_gqa=True).transpose(1, 2)
    sd = statistics.median(graph_times(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, kd, vd, scale=sc, enable_gqa=True), reps=7))
    out = []
    for kernel in choices:
        ops.DECODE_KERNEL = kernel
        o = ops.cq_attention(q, view, None, sc)
        ran = ops.KERNEL_USED.get("attention")
        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        t = statistics.median(graph_times(lambda: ops.cq_attention(q, view, None, sc), reps=7))
        out.append(f"{kernel}[{ran}] {t * 1000:.1f} (rel {err:.1e})")
    ops.DECODE_KERNEL = "auto"
    print(f"{label} CQ-{spec_name} w{window} {B}x{S}: SDPA {sd * 1000:.1f} us; " + "; ".join(out), flush=True)
    del q, view, kd, vd
    torch.cuda.empty_cache()
