#!/bin/bash
# a whole GQA decode step (Llama-3-8b shapes, 4K prompt, batch 1) as CUDA graphs: final code vs 2830117 (old.tar)
export TORCH_EXTENSIONS_DIR=/tmp/ext
mkdir -p /tmp/old && tar -xf .dev/s17/old.tar -C /tmp/old
L=$OUT/log.txt
date -u > $L
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old python3 -c "from cqtool import ops; assert ops.get_module() is not None") >> $L 2>&1 &
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None" >> $L 2>&1
wait; date -u >> $L
A="bench generate --batch 1 --prompt 4096 --new-tokens 64 --repeats 1 --graphs --no-same-batch --no-search --kv-heads 8"
PYTHONPATH=$PWD timeout 110 python3 -m cqtool $A --json $OUT/gen-new.json > $OUT/gen-new.txt 2>&1
date -u >> $L
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old timeout 110 python3 -m cqtool $A --json $OUT/gen-old.json > $OUT/gen-old.txt 2>&1)
date -u >> $L
cat $L; for v in new old; do python3 -c "
import json
d = json.load(open('$OUT/gen-$v.json'))
g = d.get('graphs') or d
print('$v', json.dumps(g)[:600])
" 2>&1 | head -5; done
