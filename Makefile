# Every target creates .venv on first use and installs the project into it.
# torch is pinned and installed first so that no CUDA wheels are pulled on CPU machines.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

# make shards [INPUT='SPEC ...'] [SHARDS=...] [TOKENIZER=...] [WORKERS=...]
# INPUT: manifests, folders, webdataset tars or quoted patterns ('laion/{00000..09999}.tar'), space-separated
CORPUS    ?= data/demo_corpus
MANIFEST  ?= $(CORPUS)/manifest.jsonl
INPUT     ?= $(MANIFEST)
SHARDS    ?= data/shards
TOKENIZER ?= patch-kmeans
WORKERS   ?= 2
SEED      ?= 0
SHARD_ARGS = $(foreach i,$(INPUT),--input '$(i)') --out $(SHARDS) --workers $(WORKERS) --seed $(SEED)

.PHONY: venv test demo shards corpus bench lint clean gpu-check

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: venv
	$(PY) -m ruff check src data_prep launch tests bench
	$(PY) -m pytest -q tests

corpus: venv
	@if [ "$(INPUT)" = "$(CORPUS)/manifest.jsonl" ] && [ ! -f "$(INPUT)" ]; then \
		$(PY) data_prep/synth_corpus.py --out $(CORPUS) --seed $(SEED); fi

# the embedded tokenizer is fitted once, as its own step, before the units are tokenized
shards: venv corpus
	@if [ "$(TOKENIZER)" = "patch-kmeans" ]; then $(PY) data_prep/make_shards.py --fit-only $(SHARD_ARGS); fi
	$(PY) data_prep/make_shards.py $(SHARD_ARGS) --tokenizer $(TOKENIZER)

demo: venv
	$(PY) -m lvm.demo --corpus $(CORPUS) --shards $(SHARDS) --seed $(SEED)

bench: venv
	set -e; for b in bench/bench_*.py; do $(PY) $$b; done

# what only a GPU can show, in one table (~8 minutes on one H100; docs/benchmarks.md); one line and exit 2 without a GPU
gpu-check: venv
	@$(PY) bench/gpu_check.py

lint: venv
	$(PY) -m ruff check src data_prep launch tests bench

clean:
	rm -rf data runs
