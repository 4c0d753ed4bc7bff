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

.PHONY: venv test demo shards corpus pan-corpus bench lint clean gpu-check gpu-wheels bench-data bench-all

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

# make demo [CORPUS=folder with a manifest.jsonl] [DEMO_SHARDS=dir]: src/lvm/demo.py picks the shard folder
# (data/shards for the embedded corpus, else data/shards-<corpus name>); exits 1 when the model did not learn
demo: venv
	$(PY) -m lvm.demo --corpus $(CORPUS) $(if $(DEMO_SHARDS),--shards $(DEMO_SHARDS)) --seed $(SEED)

# a second video corpus for `make demo CORPUS=data/pan_corpus`: camera pans over scikit-image's photographs
pan-corpus: venv
	$(PY) data_prep/synth_corpus.py --pans 200 --frames 16 --out data/pan_corpus --seed $(SEED)

# each bench prints a table (numbers in docs/benchmarks.md); bench-data writes 5.4 GB of shards and takes
# 25-40 minutes on 2 cores, so it is its own target (bench-all runs both)
bench: venv
	set -e; for b in bench/bench_*.py; do [ $$b = bench/bench_data.py ] || $(PY) $$b; done

bench-data: venv
	$(PY) bench/bench_data.py

bench-all: bench bench-data

# what only a GPU can show, in one table (~8 minutes on one H100; docs/benchmarks.md); one line and exit 2 without a GPU.
# Where $(GPU_PYTHON) already holds a CUDA PyTorch (a cluster module, a container image), that interpreter runs
# the check, with what it lacks installed from $(WHEELS) into $(GPU_SITE) (no index needed); else the venv does.
GPU_PYTHON ?= python3
WHEELS     ?= wheels/gpu
GPU_SITE   ?= .gpu-site
HAVE       ?= gpu-freeze.txt

ifneq ($(filter gpu-check,$(MAKECMDGOALS)),)
GPU_SYSTEM := $(shell [ ! -x $(PY) ] && $(GPU_PYTHON) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null && echo yes)
endif
ifeq ($(GPU_SYSTEM),yes)
gpu-check:
	@if [ -d $(WHEELS) ]; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade \
		--target $(GPU_SITE) $(WHEELS)/*.whl || exit 1; fi
	PYTHONPATH=$(CURDIR)/src:$(CURDIR)/$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PATH=$(CURDIR)/$(GPU_SITE)/bin:$$PATH \
		$(GPU_PYTHON) bench/gpu_check.py
else
gpu-check: venv
	@$(PY) bench/gpu_check.py
endif

# the wheels an offline GPU machine lacks, for make gpu-check there; HAVE = that machine's `python3 -m pip freeze`
gpu-wheels: venv
	$(PY) launch/wheelhouse.py --have $(HAVE) --out $(WHEELS)

lint: venv
	$(PY) -m ruff check src data_prep launch tests bench

clean:
	rm -rf data runs
