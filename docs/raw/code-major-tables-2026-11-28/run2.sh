#!/bin/bash
# c = 4 prologue placement: A (early, a.tar) vs B (working tree: late for c = 4); the c = 4 / c = 8 decode tests on B
export TORCH_EXTENSIONS_DIR=/tmp/ext
mkdir -p /tmp/a && tar -xf .dev/s16/a.tar -C /tmp/a
date -u > $OUT/log.txt
(cd /tmp/a && PYTHONPATH=/tmp/a TORCH_EXTENSIONS_DIR=/tmp/ext-a python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()") >> $OUT/log.txt 2>&1 &
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()" >> $OUT/log.txt 2>&1
wait
for r in 1 2; do
  PYTHONPATH=$PWD timeout 100 python3 -m cqtool bench attention --reps 20 --spec 4c8b --json $OUT/c4-B-$r.json > /dev/null 2>&1
  (cd /tmp/a && PYTHONPATH=/tmp/a TORCH_EXTENSIONS_DIR=/tmp/ext-a timeout 100 python3 -m cqtool bench attention --reps 20 --spec 4c8b --json $OUT/c4-A-$r.json > /dev/null 2>&1)
done
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py -k "decode or mma or bench" 2>&1 | tail -3 >> $OUT/log.txt
date -u >> $OUT/log.txt
cat $OUT/log.txt | tail -8
