#!/bin/bash
# final kernel + auto rule: whole CUDA suite; kernel choices at short shapes (auto); GQA long shapes new vs old x3
export TORCH_EXTENSIONS_DIR=/tmp/ext
mkdir -p /tmp/old && tar -xf .dev/s17/old.tar -C /tmp/old
L=$OUT/log.txt
(date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; git log --oneline -1) > $L
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()") > /dev/null 2>&1 &
PYTHONPATH=$PWD python3 -c "from cqtool import ops; assert ops.get_module() is not None, ops.kernel_status()" >> $L 2>&1
date -u >> $L
PYTHONPATH=$PWD timeout 260 python3 -m pytest -q -p no:cacheprovider -m cuda 2>&1 | tail -4 > $OUT/cuda-suite.txt
cat $OUT/cuda-suite.txt >> $L; date -u >> $L
wait
PYTHONPATH=$PWD timeout 100 python3 .dev/s17/probe2.py final > $OUT/probe2-final.txt 2>&1
date -u >> $L
for r in 1 2 3; do
PYTHONPATH=$PWD timeout 60 python3 -m cqtool bench attention --reps 20 --kv-heads 8 --spec 8c8b --shape 32x8192 --shape 8x32768 --json /tmp/l-new-$r.json > /dev/null 2>&1
(cd /tmp/old && PYTHONPATH=/tmp/old TORCH_EXTENSIONS_DIR=/tmp/ext-old timeout 60 python3 -m cqtool bench attention --reps 20 --kv-heads 8 --spec 8c8b --shape 32x8192 --shape 8x32768 --json /tmp/l-old-$r.json > /dev/null 2>&1)
done
date -u >> $L
python3 - >> $OUT/long.txt <<'PY'
import json
for r in (1, 2, 3):
    for n in ("old", "new"):
        d = json.load(open(f"/tmp/l-{n}-{r}.json"))
        print(n, r, "  ".join(f"{x['batch']}x{x['context']} graph {x['cq_graph_ms']*1000:.1f} events {x['cq_ms']*1000:.1f} (sdpa {x['sdpa_graph_ms']*1000:.1f} / {x['sdpa_ms']*1000:.1f})" for x in d["rows"]))
PY
cat $L $OUT/long.txt
