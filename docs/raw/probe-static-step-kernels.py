"""GPU time of one static decode step by kernel, StaticCache vs the CQ cache in static mode (the steps
`bench generate --graphs` replays, run eagerly here so that the profiler sees each kernel): 32 Llama-2-7b-shaped
layers, random weights, bf16, 2K prompt, CQ-8c8b. Usage: python3 probe-static-step-kernels.py [B ...]"""
import collections, sys
import torch
from cqtool.bench_kernels import random_llama, random_codebook
from cqtool.config import QuantSpec
from cqtool.graphs import StaticDecoder, static_cache

P, STEPS = 2048, 20
model = random_llama(layers=32)
cb = random_codebook(model, QuantSpec.parse("8c8b"))


def bucket(name):
    n = name.lower()
    for key, label in [("encode", "cq encode"), ("decode_mma", "cq decode (tensor cores)"), ("combine", "cq split combine"),
                       ("decode", "cq decode (other)"), ("flash", "sdpa flash"), ("efficient", "sdpa mem-efficient"),
                       ("gemm", "gemm"), ("gemv", "gemm"), ("nvjet", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm")]:
        if key in n:
            return label
    return "other (" + name[:40] + ")"


for B in [int(a) for a in sys.argv[1:]] or [1, 8]:
    for kind in ["static", "cq"]:
        cache = static_cache(model, kind, P + 64, cb)
        ids = torch.randint(0, 32000, (B, P), device="cuda")
        dec = StaticDecoder(model, cache, P + 64, graph=False)
        first = dec.prefill(ids)
        dec.decode(first, 4)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            dec.decode(first, STEPS)
        per = collections.Counter()
        byname = collections.Counter()
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
                per[bucket(e.key)] += e.device_time_total / STEPS
                byname[e.key[:90]] += e.device_time_total / STEPS
        tot = sum(per.values())
        print(f"B={B} {kind}: GPU time per step {tot / 1e3:.3f} ms")
        for k, v in per.most_common():
            print(f"   {v / 1e3:8.3f} ms  {100 * v / tot:5.1f}%  {k}")
        print("   top kernels:")
        for k, v in byname.most_common(8):
            print(f"      {v:9.1f} us  {k}")
        del cache, dec
        torch.cuda.empty_cache()
