#!/bin/bash
# final code (c = 4 GQA threshold 65536): whole CUDA suite; bench attention GQA CQ-4c8b as auto runs it
export TORCH_EXTENSIONS_DIR=/tmp/ext
L=$OUT/log.txt
(date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; git log --oneline -1) > $L
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()" >> $L 2>&1
PYTHONPATH=$PWD timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda 2>&1 | tail -4 > $OUT/cuda-suite.txt
tail -2 $OUT/cuda-suite.txt >> $L; date -u >> $L
PYTHONPATH=$PWD timeout 100 python3 -m cqtool bench attention --reps 20 --kv-heads 8 --spec 4c8b --json $OUT/att-kv8-c4.json > $OUT/att-kv8-c4.txt 2>&1
date -u >> $L
cat $L; python3 -c "
import json
d = json.load(open('$OUT/att-kv8-c4.json'))
for x in d['rows']:
    print(x['quant'], x['batch'], x['context'], x['cq_kernel'], 'graph', round(x['cq_graph_ms'] * 1000, 1), 'sdpa', round(x['sdpa_graph_ms'] * 1000, 1), 'x', round(x['graph_speedup'], 2))
"
