# GPU kernel time (torch.profiler, us per call) of the CQ-8c8b MHA tensor-core decode with ops.MMA_LONG_MIN = 0 (LONG
# build for every item) and 2^30 (short-item build), at BxS shapes (32 heads x 128, bf16)
import sys, torch
from cqtool import ops
from cqtool.bench_kernels import synthetic_layer, gpu_time_us
from cqtool.config import QuantSpec
ops.DECODE_KERNEL = "tensor-core"
for shape in sys.argv[1:]:
    B, S = map(int, shape.split("x"))
    q, view, _, _ = synthetic_layer(B, S, 32, 128, QuantSpec.parse("8c8b"), dense=False)
    fn = lambda: ops.cq_attention(q, view, None, 128 ** -0.5)
    line = f"MHA 8c8b {shape}:"
    res = {}
    for rep in range(2):
        for lm in (0, 1 << 30):
            ops.MMA_LONG_MIN = lm
            t = gpu_time_us(fn, reps=20)
            res.setdefault(lm, []).append(t)
            name = ops.KERNEL_USED.get("attention")
    a, b = min(res[0]), min(res[1 << 30])
    print(f"{line} long {a:.1f} us ({', '.join(f'{x:.1f}' for x in res[0])}) | short {b:.1f} us "
          f"({', '.join(f'{x:.1f}' for x in res[1 << 30])}) | short/long {b / a:.3f}", flush=True)
    del q, view
    torch.cuda.empty_cache()
