#!/bin/bash
# the wait moved out of the tile loop: decode tests; short-shape kernel choices (new only); GQA long shapes new vs old x2
export TORCH_EXTENSIONS_DIR=/tmp/ext
mkdir -p /tmp/old && tar -xf .dev/s17/old.tar -C /tmp/old
L=$OUT/log.txt
date -u > $L
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()") > $OUT/build-old.txt 2>&1 &
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()" > $OUT/build-new.txt 2>&1
tail -3 $OUT/build-new.txt >> $L
wait
PYTHONPATH=$PWD timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py -k "mma or decode" 2>&1 | tail -15 > $OUT/tests.txt
tail -3 $OUT/tests.txt >> $L; date -u >> $L
PYTHONPATH=$PWD timeout 200 python3 .dev/s17/probe2.py new > $OUT/probe2.txt 2>&1
date -u >> $L
for r in 1 2; do
PYTHONPATH=$PWD timeout 90 python3 -m cqtool bench attention --reps 20 --kv-heads 8 --spec 8c8b --shape 8x32768 --shape 32x8192 --shape 1x32768 --json $OUT/att-new-$r.json > /dev/null 2>&1
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old timeout 90 python3 -m cqtool bench attention --reps 20 --kv-heads 8 --spec 8c8b --shape 8x32768 --shape 32x8192 --shape 1x32768 --json $OUT/att-old-$r.json > /dev/null 2>&1)
done
date -u >> $L
cat $L; cat $OUT/probe2.txt
