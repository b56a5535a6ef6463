# Kernel-level times of one decode call with and without a 128-token window (torch.profiler, CUDA activity).
# Run on a GPU from the repository root: PYTHONPATH=$PWD python3 docs/raw/probe-window-kernels.py
import statistics, torch
from torch.profiler import profile, ProfilerActivity
from cqtool import ops
from cqtool.bench_kernels import synthetic_layer, cuda_times
from cqtool.config import QuantSpec
ops.DECODE_KERNEL = "tensor-core"
for B, S, H, KV in [(32, 8192, 32, 32), (8, 32768, 32, 32), (1, 32768, 32, 32)]:
    for w in (0, 128):
        q, view, kd, vd = synthetic_layer(B, S, KV, 128, QuantSpec.parse("8c8b"), q_heads=H, window=w)
        f = lambda: ops.cq_attention(q, view, None, 128**-0.5)
        t = statistics.median(cuda_times(f, reps=20))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): f()
            torch.cuda.synchronize()
        rows = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                rows.setdefault(e.name[:60], []).append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
        print(f"{B}x{S} window {w}: {t:.4f} ms;", "; ".join(f"{k}: {statistics.median(v):.1f} us x{len(v)//5}" for k, v in rows.items()), flush=True)
        del q, view, kd, vd; torch.cuda.empty_cache()
