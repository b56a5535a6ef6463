"""Why DynamicCache's decode step on two GPUs took 4x the one-GPU step for 2.2x the batch: per-step time at several
batches and memory caps, layers spread over 1 or 2 GPUs (64 timed steps after 16 untimed, synthetic 2048-token fill)."""
import os, sys, time
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch
from cqtool.bench_kernels import GenSetup, random_llama, random_codebook, spread_model, run_generation, _release
from cqtool.cache import prepare_model
from cqtool.config import QuantSpec

total = torch.cuda.get_device_properties(0).total_memory
model = random_llama(32)
cb = random_codebook(model, QuantSpec.parse("8c8b"))
prepare_model(model)
def one(setup, kind, B, cap_gb, steps=64):
    for d in range(setup.gpus):
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total), d)
    try:
        run_generation(kind, setup, B, real_prefill=False, steps=16)
        r = run_generation(kind, setup, B, real_prefill=False, steps=steps)
        print(f"gpus {setup.gpus} {kind} B {B} cap {cap_gb} GB: {1e3 * r['decode_s'] / steps:.1f} ms/step, "
              f"{r['decode_tok_s']:.0f} tok/s, peak {r['peak_gib']:.1f} GiB", flush=True)
    except torch.OutOfMemoryError:
        print(f"gpus {setup.gpus} {kind} B {B} cap {cap_gb}: OOM", flush=True)
        _release()
s1 = GenSetup(model, cb, prompt=2048, new_tokens=64, gpus=1)
one(s1, "dynamic", 52, 80)
one(s1, "dynamic", 52, 140)
one(s1, "dynamic", 26, 80)
model = spread_model(model, 2)
s2 = GenSetup(model, cb, prompt=2048, new_tokens=64, gpus=2)
one(s2, "dynamic", 52, 80)
one(s2, "dynamic", 113, 80)
one(s2, "dynamic", 113, 140)
