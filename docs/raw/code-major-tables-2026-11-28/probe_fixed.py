"""Where the fixed GPU cost of a short CQ decode attention call goes: every kernel one call launches (torch.profiler
trace: name, grid, block, shared memory, registers, duration), for each decode choice, beside SDPA on the same data."""
import json
import os
import statistics
import sys
import tempfile

import torch

from cqtool import ops
from cqtool.bench_kernels import graph_times, synthetic_layer
from cqtool.config import QuantSpec

OUT = os.environ.get("OUT", "/tmp")


def trace(fn, reps=10):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    path = tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    ev = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    os.unlink(path)
    ev.sort(key=lambda e: e["ts"])
    per = len(ev) // reps
    rows = {}
    for e in ev:
        a = e.get("args", {})
        key = (e["name"][:70], str(a.get("grid")), str(a.get("block")), a.get("shared memory"), a.get("registers per thread"))
        rows.setdefault(key, []).append(e["dur"])
    span = (ev[-1]["ts"] + ev[-1]["dur"] - ev[0]["ts"]) / reps
    return per, rows, span


shapes = [(1, 1024), (1, 4096), (4, 4096), (1, 32768)]
for kv in (32, 8):
    for spec_name in ("8c8b", "4c8b"):
        spec = QuantSpec.parse(spec_name)
        for B, S in shapes:
            q, view, kd, vd = synthetic_layer(B, S, kv, 128, spec, q_heads=32)
            sc = 128 ** -0.5
            g = 32 // kv
            kde, vde = (kd, vd) if g == 1 else (kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1))
            fns = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, kde, vde, scale=sc)}
            for choice in ("auto", "cuda-core", "tensor-core", "dequant-sdpa"):
                def f(choice=choice):
                    ops.DECODE_KERNEL = choice
                    return ops.cq_attention(q, view, None, sc)
                fns[choice] = f
            print(f"=== kv_heads {kv} CQ-{spec_name} {B}x{S}", flush=True)
            for name, fn in fns.items():
                try:
                    gms = statistics.median(graph_times(fn))
                    per, rows, span = trace(fn)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name}: failed {type(e).__name__}: {str(e)[:200]}")
                    continue
                kern = sum(sum(v) for v in rows.values()) / 10
                used = ops.KERNEL_USED.get("attention") if name != "sdpa" else ""
                print(f"  {name:13s} graph {gms*1e3:7.1f} us  kernels/call {per}  kernel-sum {kern:6.1f} us  "
                      f"span/call {span:6.1f} us  ran={used}")
                for (kname, grid, block, smem, regs), durs in rows.items():
                    print(f"      {statistics.median(durs):7.1f} us x{len(durs)//10:<2d} grid {grid} block {block} "
                          f"smem {smem} regs {regs} {kname}")
            ops.DECODE_KERNEL = "auto"
            del q, view, kd, vd, kde, vde
            torch.cuda.empty_cache()
