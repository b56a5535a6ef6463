"""Host cost of a decode step at batch 8 (Llama-2-7b-shaped layers, random weights): CQ cache vs DynamicCache.
Wall ms per step, GPU busy time per step, and the host time spent in each cache's own code per layer."""
import collections, cProfile, pstats, sys, time
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from cqtool import ops
from cqtool.bench_kernels import random_llama, random_codebook, _decode, cache_kwarg
from cqtool.cache import CQCache, CQLayer
from cqtool.config import QuantSpec
import transformers.integrations.sdpa_attention as SA

L = int(sys.argv[1]) if len(sys.argv) > 1 else 8
B, P = 8, 2048
model = random_llama(layers=L)
cb = random_codebook(model, QuantSpec.parse("8c8b"))
kw = cache_kwarg(model)
acc = collections.Counter()

def timed(name, f):
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[name] += time.perf_counter() - t; return r
    return g

def fresh(kind):
    cache = DynamicCache() if kind == "dynamic" else CQCache(model, cb, max_length=P + 400)
    ids = torch.randint(0, 32000, (B, P), device="cuda")
    with torch.no_grad():
        for s in range(0, P, 256):
            model(input_ids=ids[:, s:s + 256], **{kw: cache}, use_cache=True, logits_to_keep=1)
    return cache

tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
for kind in ["dynamic", "cq", "dynamic", "cq"]:
    c = fresh(kind)
    _decode(model, c, tok, 5)
    t, _ = _decode(model, c, tok, 40)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _decode(model, c, tok, 10)
    gpu = sum(e.device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 10
    print(f"{kind:8s} wall {t / 40 * 1e3:7.2f} ms/step  GPU busy {gpu / 1e3:7.2f} ms/step  wall per layer {t / 40 / L * 1e6:6.1f} us")
    del c; torch.cuda.empty_cache()

# host time inside each cache's own code (no sync inside: launch + Python cost)
CQLayer.update = timed("cq: CQLayer.update (encode K, V)", CQLayer.update)
ops.cq_attention = timed("cq: ops.cq_attention", ops.cq_attention)
DynamicLayer.update = timed("dyn: DynamicLayer.update (cat)", DynamicLayer.update)
SA.sdpa_attention_forward = timed("dyn: sdpa_attention_forward", SA.sdpa_attention_forward)
import transformers.modeling_utils as MU
for kind in ["dynamic", "cq"]:
    c = fresh(kind)
    _decode(model, c, tok, 3)
    acc.clear()
    n = 20
    t, _ = _decode(model, c, tok, n)
    print(f"{kind}: wall {t / n * 1e3:.2f} ms/step; host us per layer in:",
          ", ".join(f"{k} {v / n / L * 1e6:.1f}" for k, v in acc.items()))
    pr = cProfile.Profile(); pr.enable(); _decode(model, c, tok, 10); pr.disable()
    print(f"--- cProfile {kind} (10 steps, {L} layers), by own time")
    pstats.Stats(pr).sort_stats("tottime").print_stats(28)
    del c; torch.cuda.empty_cache()
