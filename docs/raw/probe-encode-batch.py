"""GPU time of a decode step's encode (one token per sequence, keys and values of one layer, CQ-8c8b, 32 heads x 128,
bf16) against the decode attention over S cached tokens at the same batch: what share of a layer's CQ work the encode
is, from batch 1 to the largest batch in 80 GB. CUDA events, median of 3 x 20 calls.
Usage: python3 probe-encode-batch.py [S] [B ...]"""
import sys
import torch
from cqtool import ops, quant
from cqtool.bench_kernels import synthetic_layer
from cqtool.config import QuantSpec

S = int(sys.argv[1]) if len(sys.argv) > 1 else 2304
Bs = [int(a) for a in sys.argv[2:]] or [1, 8, 64, 256, 733]
spec, H, D = QuantSpec.parse("8c8b"), 32, 128


def timed(f, n=20):
    ts = []
    for _ in range(3):
        f(); torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            f()
        b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / n)
    return sorted(ts)[1]


print(f"S={S}  B | encode K+V one launch ms | encode K, V two launches ms | attention ms | encode / attention")
for B in Bs:
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(B, 1, H, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    v = torch.randn(B, H, 1, D, device="cuda", generator=g).to(torch.bfloat16)
    kc = torch.randn(H, D // 8, 256, 8, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(H, D // 8, 256, 8, device="cuda", generator=g).to(torch.bfloat16)
    kcodes = torch.zeros(B, H, 4, quant.row_bytes(D // 8, 8), dtype=torch.uint8, device="cuda")
    vcodes = torch.zeros_like(kcodes)
    one = timed(lambda: ops.encode_kv_into(k, kc, 8, kcodes, v, vc, 8, vcodes, 1))
    two = timed(lambda: (ops.encode_into(k, kc, 8, kcodes, 1), ops.encode_into(v, vc, 8, vcodes, 1)))
    q, view, _, _ = synthetic_layer(B, S, H, D, spec, dense=False)
    att = timed(lambda: ops.cq_attention(q, view, None, D ** -0.5))
    print(f"{B:5d} | {one:.4f} | {two:.4f} | {att:.4f} | {one / att:.2f}  ({ops.KERNEL_USED})", flush=True)
    del q, view
    torch.cuda.empty_cache()
