# Where the time of one decode-attention call goes at small shapes: host time per call (no sync), GPU kernel time
# (torch.profiler), and the bench's event timing, for CQ (auto) and SDPA.
import statistics, sys, time
import torch
from cqtool import ops
from cqtool.bench_kernels import synthetic_layer, cuda_times
from cqtool.config import QuantSpec

for shape in sys.argv[1:] or ["1x4096", "1x32768"]:
    B, S = map(int, shape.split("x"))
    q, view, kd, vd = synthetic_layer(B, S, 32, 128, QuantSpec.parse("8c8b"))
    sc = 128 ** -0.5
    fns = {"cq": lambda: ops.cq_attention(q, view, None, sc),
           "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, scale=sc)}
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
        ev = statistics.median(cuda_times(fn, reps=50)) * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        kern = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kern[e.key[:60]] = e.device_time_total / 10
        gpu = sum(kern.values())
        print(f"{shape} {name}: host {host:.1f} us/call (no sync), events {ev:.1f} us, GPU kernels {gpu:.1f} us: "
              + "; ".join(f"{k} {v:.1f}" for k, v in kern.items()), flush=True)
        if name == "cq":
            print("   ran:", ops.KERNEL_USED.get("attention"))
