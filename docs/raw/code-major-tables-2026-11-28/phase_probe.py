"""Phase times inside the tensor-core decode kernel (a probe, not project code): a copy of kernels/ with %globaltimer
stamps at the kernel's entry, after the first item's prologue is issued, when tile 0's loads have landed, after the tile
loop, before the histogram x centroids product and at the end; thread 0 of each block prints them."""
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

CHILD = len(sys.argv) > 1 and sys.argv[1] == "child"
src = Path("kernels")
VAR = os.environ.get("PHASE_VARIANT", "base")
dst = Path("/tmp/kphase-" + VAR)
if not CHILD and dst.exists():
    shutil.rmtree(dst)
if not CHILD:
    shutil.copytree(src, dst)
f = dst / "decode_mma.cu"
s = (src / "decode_mma.cu").read_text()
HDR = """
__device__ unsigned long long cq_st[4096 * 8];
#define CQ_STAMP(k) do { if (threadIdx.x == 0) { unsigned long long t_; \\
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)); cq_st[blockIdx.x * 8 + (k)] = t_; } } while (0)
"""
def sub(old, new, count=1):
    global s
    assert s.count(old) == count, (old, s.count(old))
    s = s.replace(old, new)
sub("constexpr int kDelta = 64;", HDR + "constexpr int kDelta = 64;")
sub("  using C = Cfg<NW, R, KC>;\n  constexpr int kNW = C::kNW,", "  CQ_STAMP(0);\n  using C = Cfg<NW, R, KC>;\n  constexpr int kNW = C::kNW,")
sub("  if (i_begin < i_end) prologue(item_at(i_begin));\n", "  if (i_begin < i_end) prologue(item_at(i_begin));\n  CQ_STAMP(1);\n")
sub("      cp_async_wait<kMStages - 2>();\n      __syncthreads();\n      const uint8_t* sv_prev",
    "      cp_async_wait<kMStages - 2>();\n      __syncthreads();\n      if (it == 0) CQ_STAMP(2);\n      const uint8_t* sv_prev")
sub("    if (direct) {\n      // ---- P.V of a short item", "    CQ_STAMP(3);\n    if (direct) {\n      // ---- P.V of a short item")
sub("    // ---- histogram x value centroids.", "    CQ_STAMP(4);\n    // ---- histogram x value centroids.")
sub("""    __syncthreads();  // the bins and red are read before the next item reuses them
  }
}""", """    __syncthreads();  // the bins and red are read before the next item reuses them
  }
  CQ_STAMP(5);
  if (threadIdx.x == 0) {
    unsigned smid; asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    const unsigned long long* t = cq_st + blockIdx.x * 8;
    printf("ST %d %u %llu %llu %llu %llu %llu %llu %llu %llu\\n", blockIdx.x, smid, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
  }
}""")
sub("    if (it.ntile > 0 && it.hk != cur_hk) {\n      // a table copy", "    CQ_STAMP(6);\n    if (it.ntile > 0 && it.hk != cur_hk) {\n      // a table copy")
sub("      cur_hk = it.hk;\n    }\n", "      cur_hk = it.hk;\n    }\n    CQ_STAMP(7);\n")
if VAR == "linear":
    sub("kcent + (gamma * kCodes + code) * 8);", "kcent + (i & 4095) * 8);")
    sub("kcent + (gamma * kCodes + code) * 4);", "kcent + (i & 8191) * 4);")
if not CHILD:
    f.write_text("#include <cstdio>\n" + s)

from cqtool import ops
ops.KERNEL_DIR = dst
os.environ["TORCH_EXTENSIONS_DIR"] = "/tmp/ext-phase-" + VAR
if len(sys.argv) > 1 and sys.argv[1] == "child":
    from cqtool.bench_kernels import synthetic_layer
    from cqtool.config import QuantSpec
    kv, spec, B, S = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    q, view, kd, vd = synthetic_layer(B, S, kv, 128, QuantSpec.parse(spec), q_heads=32, dense=False)
    ops.DECODE_KERNEL = "tensor-core"
    for _ in range(3):
        ops.cq_attention(q, view, None, 128 ** -0.5)
    torch.cuda.synchronize()
    print("CALL", flush=True)
    ops.cq_attention(q, view, None, 128 ** -0.5)
    torch.cuda.synchronize()
    print("RAN", ops.KERNEL_USED.get("attention"), flush=True)
    sys.exit(0)

assert ops.get_module() is not None, ops.kernel_status()
print("variant", VAR)
for kv, spec, B, S in [(32, "8c8b", 1, 1024), (32, "8c8b", 1, 4096), (8, "8c8b", 1, 4096), (32, "4c8b", 1, 4096)]:
    out = subprocess.run([sys.executable, __file__, "child", str(kv), spec, str(B), str(S)], capture_output=True,
                         text=True)
    text = out.stdout
    ran = re.findall(r"RAN (.*)", text)
    last = text.split("CALL")[-1]
    rows = [list(map(int, ln.split()[1:])) for ln in last.splitlines() if ln.startswith("ST ")]
    if not rows:
        print(kv, spec, B, S, "no stamps", out.stderr[-500:])
        continue
    t0 = min(r[2] for r in rows)
    tend = max(r[7] for r in rows)
    ph = {name: [(r[i + 1] - r[i]) / 1e3 for r in rows] for i, name in
          zip(range(2, 7), ("prologue issue", "wait tile 0", "tile loop", "last scatter+flush", "product+store"))}
    ph["  entry->prologue"] = [(r[8] - r[2]) / 1e3 for r in rows]
    ph["  table issue"] = [(r[9] - r[8]) / 1e3 for r in rows]
    ph["  stages issue"] = [(r[3] - r[9]) / 1e3 for r in rows]
    start = [(r[2] - t0) / 1e3 for r in rows]
    print(f"kv {kv} CQ-{spec} {B}x{S}: {len(rows)} blocks ({ran}), first start to last end {(tend - t0) / 1e3:.1f} us; "
          f"block starts spread {max(start):.1f} us; block total median {statistics.median([(r[7]-r[2])/1e3 for r in rows]):.1f} us")
    for name, v in ph.items():
        print(f"    {name:20s} median {statistics.median(v):7.2f} us  min {min(v):7.2f}  max {max(v):7.2f}")
