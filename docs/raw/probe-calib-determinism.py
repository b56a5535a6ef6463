# Which part of GPU calibration is not reproducible: the gather (activations, Fisher weights) or k-means? Same
# process, random-weight SmolLM2-135M shapes (docs/raw/calib-reproducibility-h100-2026-11-27v.txt). usage: python3 probe-calib-determinism.py
import os, sys
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch
from cqtool.models import load_model
from cqtool.collect import KVCollector
from cqtool import kmeans

m, tok, info = load_model("random:smollm2-135m", "cuda", "auto")
for p in m.parameters():
    p.requires_grad_(False)
V = m.config.vocab_size
ids = torch.randint(0, V, (4, 2048), generator=torch.Generator().manual_seed(0)).cuda()


def gather():
    coll = KVCollector(m, 4 * 2048, fisher=True, fisher_group=8, store_dtype=torch.float16)
    for w in ids:
        coll.add_batch(w.unsqueeze(0))
    coll.close()
    coll.model = None
    return coll


def cmp(tag):
    a, b = gather(), gather()
    out = []
    for name in ("keys", "values", "key_fisher", "value_fisher"):
        x, y = getattr(a, name), getattr(b, name)
        out.append(f"{name} {sum(bool((x[l] == y[l]).all()) for l in range(x.shape[0]))}/{x.shape[0]}")
    print(tag, m.config._attn_implementation, "identical layers:", ", ".join(out), flush=True)
    return a


for det in (False, True):
    torch.use_deterministic_algorithms(det, warn_only=True)
    for impl in ("sdpa", "eager"):
        m.set_attn_implementation(impl)
        a = cmp(f"deterministic={det}")
torch.use_deterministic_algorithms(False)
x = a.keys[3].to("cuda", torch.float32).view(-1, 24, 8).transpose(0, 1).contiguous()
w = a.key_fisher[3].cuda().transpose(0, 1).contiguous()
for det in (False, True):
    torch.use_deterministic_algorithms(det, warn_only=True)
    r = [kmeans.fit(x, 256, w, iters=100, seed=0, backend="torch") for _ in range(2)]
    print(f"kmeans deterministic={det}: equal {torch.equal(r[0].centroids, r[1].centroids)} max|d| "
          f"{float((r[0].centroids - r[1].centroids).abs().max()):.3g} iters {r[0].iterations} {r[1].iterations}", flush=True)
    r = [kmeans.fit(x, 256, None, iters=100, seed=0, backend="torch") for _ in range(2)]
    print(f"kmeans unweighted deterministic={det}: equal {torch.equal(r[0].centroids, r[1].centroids)}", flush=True)
