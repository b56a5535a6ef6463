# GPU kernel time (torch.profiler, us per call) of `auto` decode at the shapes given as HEADS/KV:SPEC:BxS
import sys, torch
from cqtool import ops
from cqtool.bench_kernels import synthetic_layer, gpu_time_us
from cqtool.config import QuantSpec
tag = sys.argv[1]
for arg in sys.argv[2:]:
    hk, spec, shape = arg.split(":")
    heads, kv = map(int, hk.split("/"))
    B, S = map(int, shape.split("x"))
    q, view, kd, vd = synthetic_layer(B, S, kv, 128, QuantSpec.parse(spec), q_heads=heads, dense=False)
    fn = lambda: ops.cq_attention(q, view, None, 128 ** -0.5)
    t = [gpu_time_us(fn, reps=20) for _ in range(3)]
    print(f"{tag} {arg}: {min(t):.1f} us (3 x 20 calls: {', '.join(f'{x:.1f}' for x in t)}) kernel {ops.KERNEL_USED.get('attention')}", flush=True)
    del q, view, kd, vd
    torch.cuda.empty_cache()
