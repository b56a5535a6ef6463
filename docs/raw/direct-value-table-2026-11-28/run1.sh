#!/bin/bash
# value table in shared memory for direct GQA items: build new + HEAD (old.tar), decode tests, GQA probes, bench
export TORCH_EXTENSIONS_DIR=/tmp/ext
mkdir -p /tmp/old && tar -xf .dev/s17/old.tar -C /tmp/old
L=$OUT/log.txt
(date -u; nvidia-smi --query-gpu=name,driver_version --format=csv) > $L
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()") > $OUT/build-old.txt 2>&1 &
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()" > $OUT/build-new.txt 2>&1
tail -3 $OUT/build-new.txt >> $L
wait
date -u >> $L
PYTHONPATH=$PWD timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py -k "mma or decode" 2>&1 | tail -15 > $OUT/tests.txt
tail -3 $OUT/tests.txt >> $L; date -u >> $L
PYTHONPATH=$PWD timeout 120 python3 .dev/s17/probe_gqa.py new > $OUT/probe.txt 2>&1
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old timeout 120 python3 $OLDPWD/.dev/s17/probe_gqa.py old >> $OUT/probe.txt 2>&1)
date -u >> $L
PYTHONPATH=$PWD timeout 90 python3 -m cqtool bench attention --reps 20 --kv-heads 8 --spec 8c8b --json $OUT/att-new-kv8.json > /dev/null 2>&1
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old timeout 90 python3 -m cqtool bench attention --reps 20 --kv-heads 8 --spec 8c8b --json $OUT/att-old-kv8.json > /dev/null 2>&1)
date -u >> $L
cat $L; cat $OUT/probe.txt
