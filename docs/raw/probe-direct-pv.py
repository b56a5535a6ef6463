# GPU kernel time per call (torch.profiler, 20 calls) of the tensor-core decode kernel at short contexts for several
# values of ops.MMA_DIRECT_MAX (env DIRECT, comma-separated; items of one tile with at most that many tokens take P.V
# straight from the codes), next to SDPA's and to the CUDA-core kernel's.
# WINDOW (default 0): a full-precision window of that many recent tokens, as `--window` keeps (the codes cover the rest).
# usage: DIRECT=0,256,512 [SPECS=8c8b,4c8b] [WINDOW=128] python3 probe-direct-pv.py HEADS KV_HEADS BxS ...
import os, sys
import torch
from cqtool import ops
from cqtool.bench_kernels import synthetic_layer, gpu_time_us as gpu_us
from cqtool.config import QuantSpec

heads, kv = int(sys.argv[1]), int(sys.argv[2])
directs = [int(x) for x in os.environ.get("DIRECT", "0,256").split(",")]
specs = os.environ.get("SPECS", "8c8b,4c8b").split(",")
window = int(os.environ.get("WINDOW", "0"))
for spec in specs:
    for shape in sys.argv[3:]:
        B, S = map(int, shape.split("x"))
        q, view, kd, vd = synthetic_layer(B, S, kv, 128, QuantSpec.parse(spec), q_heads=heads,
                                       window=window)
        sc = 128 ** -0.5
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, scale=sc, enable_gqa=heads != kv)
        line = f"{spec} {heads}/{kv} {shape}{f' window {window}' if window else ''}: SDPA {gpu_us(sdpa):.1f} us"
        fn = lambda: ops.cq_attention(q, view, None, sc)
        ops.DECODE_KERNEL = "cuda-core"
        line += f" | cuda-core {gpu_us(fn):.1f}"
        ops.DECODE_KERNEL = "tensor-core"
        for d in directs:
            ops.MMA_DIRECT_MAX = d
            line += f" | tc direct<={d} {gpu_us(fn):.1f}"
        ops.DECODE_KERNEL = "auto"
        ops.MMA_DIRECT_MAX = directs[-1]
        line += f" | auto ({ops.KERNEL_USED.get('attention')}, direct<={directs[-1]}) {gpu_us(fn):.1f}"
        print(line, flush=True)
        del q, view, kd, vd
        torch.cuda.empty_cache()
