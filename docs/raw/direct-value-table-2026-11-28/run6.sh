#!/bin/bash
# final: whole CUDA suite; each choice at short GQA shapes (auto per head); CQ-4c8b GQA long thresholds; bench attention GQA
export TORCH_EXTENSIONS_DIR=/tmp/ext
L=$OUT/log.txt
(date -u; nvidia-smi --query-gpu=name,driver_version --format=csv) > $L
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()" >> $L 2>&1
date -u >> $L
PYTHONPATH=$PWD timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda 2>&1 | tail -12 > $OUT/cuda-suite.txt
tail -3 $OUT/cuda-suite.txt >> $L; date -u >> $L
PYTHONPATH=$PWD timeout 120 python3 .dev/s17/probe3.py final > $OUT/probe3-final.txt 2>&1
date -u >> $L
PYTHONPATH=$PWD timeout 100 python3 .dev/s17/probe_c4.py > $OUT/probe-c4.txt 2>&1
date -u >> $L
PYTHONPATH=$PWD timeout 120 python3 -m cqtool bench attention --reps 20 --kv-heads 8 --json $OUT/att-kv8-final.json > $OUT/att-kv8-final.txt 2>&1
date -u >> $L
cat $L $OUT/probe3-final.txt $OUT/probe-c4.txt; tail -30 $OUT/att-kv8-final.txt
