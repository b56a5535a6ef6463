#!/bin/bash
# new kernels (working tree) vs HEAD's (old.tar), one H100: tests, phase stamps, bench attention MHA + GQA
set -x
export TORCH_EXTENSIONS_DIR=/tmp/ext
mkdir -p /tmp/old && tar -xf .dev/s16/old.tar -C /tmp/old
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpus.txt; date -u >> $OUT/gpus.txt
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()") > $OUT/build-old.txt 2>&1 &
(PYTHONPATH=$PWD python3 .dev/s16/phase_probe.py > $OUT/phase-new.txt 2>&1) &
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()" > $OUT/build-new.txt 2>&1
wait
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda -x 2>&1 | tail -8 > $OUT/cuda-suite.txt
tail -2 $OUT/cuda-suite.txt
for kv in 32 8; do
  PYTHONPATH=$PWD timeout 120 python3 -m cqtool bench attention --reps 20 --kv-heads $kv --json $OUT/att-new-kv$kv.json > $OUT/att-new-kv$kv.txt 2>&1
  (cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old timeout 120 python3 -m cqtool bench attention --reps 20 --kv-heads $kv --json $OUT/att-old-kv$kv.json > $OUT/att-old-kv$kv.txt 2>&1)
done
date -u
