#!/bin/bash
# ptxas resource usage of decode_mma.cu: HEAD (old.tar) vs working tree
mkdir -p /tmp/old && tar -xf .dev/s17/old.tar -C /tmp/old
F="-O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xptxas -v"
(cd /tmp/old/kernels && nvcc $F -c decode_mma.cu -o /tmp/old.o > $OUT/ptxas-old.txt 2>&1) &
(cd kernels && nvcc $F -c decode_mma.cu -o /tmp/new.o > $OUT/ptxas-new.txt 2>&1)
wait
for v in old new; do echo "== $v"; python3 - $OUT/ptxas-$v.txt <<'PY'
import re, sys, subprocess
lines = open(sys.argv[1]).read().splitlines()
fn = None
for l in lines:
    m = re.search(r"Compiling entry function '(\S+)'", l) or re.search(r"Function properties for (\S+)", l)
    if m: fn = m.group(1)
    if ("spill" in l or "Used" in l) and fn and "decode_mma_kernel" in fn:
        dem = subprocess.run(["c++filt", fn], capture_output=True, text=True).stdout.strip()
        dem = dem.replace("decode_mma_kernel", "K").replace("(anonymous namespace)::", "")
        print(dem[:90], "|", l.strip()[:110])
PY
done
