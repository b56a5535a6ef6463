"""CQ-4c8b GQA (Llama-3-8b shapes) at long contexts: the grouped tensor-core kernel against the CUDA-core kernel, as
CUDA graphs (GPU time), SDPA the same way."""
import statistics

import torch

from cqtool import ops
from cqtool.bench_kernels import graph_times, synthetic_layer
from cqtool.config import QuantSpec

spec = QuantSpec.parse("4c8b")
for B, S in ((1, 16384), (2, 8192), (1, 32768), (2, 32768), (4, 16384), (8, 8192), (4, 32768), (16, 8192), (8, 32768)):
    q, view, kd, vd = synthetic_layer(B, S, 8, 128, spec, q_heads=32)
    sc = 128 ** -0.5
    sd = statistics.median(graph_times(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, kd, vd, scale=sc, enable_gqa=True), reps=7))
    out = []
    for kernel in ("tensor-core", "cuda-core", "auto"):
        ops.DECODE_KERNEL = kernel
        ops.cq_attention(q, view, None, sc)
        ran = ops.KERNEL_USED.get("attention")
        t = statistics.median(graph_times(lambda: ops.cq_attention(q, view, None, sc), reps=7))
        out.append(f"{kernel}[{ran}] {t * 1000:.1f}")
    ops.DECODE_KERNEL = "auto"
    print(f"CQ-4c8b {B}x{S}: SDPA {sd * 1000:.1f} us; " + "; ".join(out), flush=True)
    del q, view, kd, vd
    torch.cuda.empty_cache()
