# Probe (2026-11-26, H100): three DynamicCache generation runs at batch 8 in one process, device allocation counts
# around each. Run from the repository root on a GPU: PYTHONPATH=. python3 docs/raw/probe-dynamic-first-run.py
# Output there: 81 / 243 / 235 decode tok/s, 205 device allocations in every run (expandable segments);
# with PYTORCH_CUDA_ALLOC_CONF="": 100 / 299 / 304 tok/s, 717-718 in every run.
import os, time
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch
from cqtool import bench_kernels as bk
from cqtool.config import QuantSpec
from cqtool.cache import prepare_model
model = bk.random_llama(32)
setup = bk.GenSetup(model, bk.random_codebook(model, QuantSpec.parse("8c8b")), 2048, 128)
prepare_model(model)
warm = bk.GenSetup(model, setup.codebook, prompt=256, new_tokens=4, chunk=setup.chunk)
for kind in ("dynamic", "cq"):
    bk.run_generation(kind, warm, 2)
def stats():
    s = torch.cuda.memory_stats()
    return {k: s.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "allocation.all.allocated")}
for i in range(3):
    a = stats(); t = time.perf_counter()
    r = bk.run_generation("dynamic", setup, 8)
    b = stats()
    print(f"dynamic run {i}: {r['decode_tok_s']:.0f} tok/s;", {k: b[k] - a[k] for k in a}, flush=True)
