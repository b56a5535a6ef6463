#!/bin/bash
# variant 3 (tensor cores, a block per query head, GQA too): decode tests; each choice at short GQA shapes
export TORCH_EXTENSIONS_DIR=/tmp/ext
L=$OUT/log.txt
(date -u; nvidia-smi --query-gpu=name,driver_version --format=csv) > $L
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()" >> $L 2>&1
date -u >> $L
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py -k "mma or decode or request or bench" 2>&1 | tail -6 > $OUT/tests.txt
tail -3 $OUT/tests.txt >> $L; date -u >> $L
PYTHONPATH=$PWD timeout 200 python3 .dev/s17/probe3.py v3 > $OUT/probe3.txt 2>&1
date -u >> $L
cat $L $OUT/probe3.txt
