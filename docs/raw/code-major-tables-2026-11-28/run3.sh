#!/bin/bash
# final code: whole CUDA suite; batch-1 / batch-8 decode steps as CUDA graphs (2K prompt), new vs HEAD~2 (old.tar)
export TORCH_EXTENSIONS_DIR=/tmp/ext
mkdir -p /tmp/old && tar -xf .dev/s16/old.tar -C /tmp/old
date -u > $OUT/log.txt; nvidia-smi --query-gpu=name,driver_version --format=csv >> $OUT/log.txt
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old python3 -c "from cqtool import ops; assert ops.get_module() is not None") >> $OUT/log.txt 2>&1 &
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda 2>&1 | tail -3 > $OUT/cuda-suite.txt
wait
cat $OUT/cuda-suite.txt >> $OUT/log.txt
for b in 1 8; do
  PYTHONPATH=$PWD timeout 100 python3 -m cqtool bench generate --batch $b --prompt 2048 --new-tokens 64 --repeats 1 --graphs --no-same-batch --no-search --json $OUT/gen-new-b$b.json > $OUT/gen-new-b$b.txt 2>&1
  (cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old timeout 100 python3 -m cqtool bench generate --batch $b --prompt 2048 --new-tokens 64 --repeats 1 --graphs --no-same-batch --no-search --json $OUT/gen-old-b$b.json > /dev/null 2>&1)
done
date -u >> $OUT/log.txt; tail -4 $OUT/log.txt
