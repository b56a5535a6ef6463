"""Each decode kernel choice at short shapes, timed as CUDA graphs (the GPU's time), against SDPA the same way."""
import statistics

import torch

from cqtool import ops
from cqtool.bench_kernels import graph_times, synthetic_layer
from cqtool.config import QuantSpec

for kv in (32, 8):
    for spec_name in ("8c8b", "4c8b"):
        spec = QuantSpec.parse(spec_name)
        for B, S in ((1, 4096), (1, 32768), (128, 512)):
            q, view, kd, vd = synthetic_layer(B, S, kv, 128, spec, q_heads=32)
            sc = 128 ** -0.5
            sd = statistics.median(graph_times(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, kd, vd, scale=sc, enable_gqa=kv != 32), reps=5))
            out = []
            keep = ops.DECODE_KERNEL
            for choice in ops.DECODE_KERNELS:
                ops.DECODE_KERNEL = choice
                try:
                    ops.cq_attention(q, view, None, sc)
                    ran = ops.KERNEL_USED.get("attention")
                    t = statistics.median(graph_times(lambda: ops.cq_attention(q, view, None, sc), reps=5))
                    out.append(f"{choice} ({ran}) {t:.4f}")
                except Exception as e:  # noqa: BLE001
                    out.append(f"{choice} failed {type(e).__name__}")
            ops.DECODE_KERNEL = keep
            print(f"kv {kv} CQ-{spec_name} {B}x{S}: SDPA {sd:.4f} ms; " + ", ".join(out), flush=True)
            del q, view, kd, vd
            torch.cuda.empty_cache()
