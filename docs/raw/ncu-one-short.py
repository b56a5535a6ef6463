# The decode call that docs/raw/ncu-source-regions.py profiles: CQ-8c8b, 32 heads x 128 (MHA), BxS from argv, 8 calls.
import sys, torch
from cqtool import ops
from cqtool.bench_kernels import synthetic_layer
from cqtool.config import QuantSpec
B, S = map(int, sys.argv[1].split("x"))
q, view, kd, vd = synthetic_layer(B, S, 32, 128, QuantSpec.parse("8c8b"), dense=False)
for _ in range(8):
    ops.cq_attention(q, view, None, 128 ** -0.5)
torch.cuda.synchronize()
print(ops.KERNEL_USED)
