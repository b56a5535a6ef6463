# GPU kernel time per call (torch.profiler, 20 calls) of each decode kernel choice at small shapes, next to SDPA's,
# and the bench's event time: does `auto` pick the faster kernel where the host does not hide it?
import os, statistics, sys
import torch
from cqtool import ops
from cqtool.bench_kernels import synthetic_layer, cuda_times, gpu_time_us as gpu_us
from cqtool.config import QuantSpec

heads, kv = int(sys.argv[1]), int(sys.argv[2])
for spec in ("8c8b", "4c8b"):
    for shape in sys.argv[3:]:
        B, S = map(int, shape.split("x"))
        win = int(os.environ.get("WINDOW", "0"))
        q, view, kd, vd = synthetic_layer(B, S, kv, 128, QuantSpec.parse(spec), q_heads=heads, window=win)
        sc = 128 ** -0.5
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, scale=sc, enable_gqa=heads != kv)
        line = f"{spec} {heads}/{kv} {shape} window {win}: SDPA gpu {gpu_us(sdpa):.1f} ev {statistics.median(cuda_times(sdpa, reps=30))*1e3:.1f}"
        for choice in ("cuda-core", "tensor-core", "auto"):
            ops.DECODE_KERNEL = choice
            fn = lambda: ops.cq_attention(q, view, None, sc)
            g = gpu_us(fn)
            ev = statistics.median(cuda_times(fn, reps=30)) * 1e3
            line += f" | {choice} ({ops.KERNEL_USED.get('attention')}) gpu {g:.1f} ev {ev:.1f}"
        ops.DECODE_KERNEL = "auto"
        print(line, flush=True)
        del q, view, kd, vd
        torch.cuda.empty_cache()
