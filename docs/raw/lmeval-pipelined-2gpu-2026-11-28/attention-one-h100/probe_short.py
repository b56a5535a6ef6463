"""Where a short decode attention call's time goes: CUDA-event time per call (what bench attention reports), the GPU
time of its kernels (torch.profiler), and the time per call of the same calls replayed from one CUDA graph."""
import statistics
import sys

import torch

from cqtool import ops
from cqtool.bench_kernels import cuda_times, gpu_time_us, synthetic_layer
from cqtool.config import QuantSpec


def graph_ms(fn, n=20, reps=10):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay(); torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / n)
    return statistics.median(out)


for spec_name in ("8c8b", "4c8b"):
    spec = QuantSpec.parse(spec_name)
    for B, S in ((1, 4096), (1, 32768), (8, 32768)):
        q, view, kd, vd = synthetic_layer(B, S, 32, 128, spec)
        sc = 128 ** -0.5
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd, scale=sc)
        cq = lambda: ops.cq_attention(q, view, None, sc)
        row = []
        for name, fn in (("sdpa", sdpa), ("cq", cq)):
            ev = statistics.median(cuda_times(fn, reps=30))
            gpu = gpu_time_us(fn) / 1e3
            try:
                gr = graph_ms(fn)
            except Exception as e:  # noqa: BLE001
                gr = float("nan"); print(name, "graph failed:", type(e).__name__, str(e)[:200])
            row.append((name, ev, gpu, gr))
        print(f"CQ-{spec_name} {B}x{S}: " + "; ".join(f"{n} events {e:.4f} ms, kernels {g:.4f} ms, graph {r:.4f} ms"
                                                      for n, e, g, r in row), flush=True)
        print("   ratio sdpa/cq: events %.2fx, kernels %.2fx, graph %.2fx" % tuple(row[0][i] / row[1][i] for i in (1, 2, 3)))
        del q, view, kd, vd
        torch.cuda.empty_cache()
