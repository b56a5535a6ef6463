"""GQA (Llama-3-8b shapes) decode attention at short and long shapes, CQ-8c8b: the tensor-core kernel with direct
items of 512 and 256 tokens, the CUDA-core kernel and auto, as CUDA graphs (GPU time), beside SDPA the same way.
Usage: probe_gqa.py [label]"""
import statistics
import sys

import torch

from cqtool import ops
from cqtool.bench_kernels import graph_times, synthetic_layer
from cqtool.config import QuantSpec

label = sys.argv[1] if len(sys.argv) > 1 else ""
spec = QuantSpec.parse("8c8b")
shapes = ((1, 512), (1, 1024), (1, 2048), (1, 4096), (1, 8192), (4, 1024), (8, 512), (8, 2048), (32, 512), (128, 64),
          (128, 256), (1, 32768))
settings = (("tc-512", "tensor-core", 512), ("tc-256", "tensor-core", 256), ("cuda-core", "cuda-core", 512),
            ("auto", "auto", 512))
for B, S in shapes:
    q, view, kd, vd = synthetic_layer(B, S, 8, 128, spec, q_heads=32)
    sc = 128 ** -0.5
    ref = torch.nn.functional.scaled_dot_product_attention(q, kd, vd, scale=sc, enable_gqa=True)
    sd = statistics.median(graph_times(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, kd, vd, scale=sc, enable_gqa=True), reps=7))
    out = []
    for name, kernel, dmax in settings:
        ops.DECODE_KERNEL, ops.MMA_DIRECT_MAX = kernel, dmax
        o = ops.cq_attention(q, view, None, sc)
        ran = ops.KERNEL_USED.get("attention")
        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        t = statistics.median(graph_times(lambda: ops.cq_attention(q, view, None, sc), reps=7))
        out.append(f"{name}[{ran}] {t * 1000:.1f} (x{sd / t:.2f}, rel {err:.4f})")
    ops.DECODE_KERNEL, ops.MMA_DIRECT_MAX = "auto", 512
    print(f"{label} {B}x{S}: SDPA {sd * 1000:.1f} us; " + "; ".join(out), flush=True)
    del q, view, kd, vd
    torch.cuda.empty_cache()
