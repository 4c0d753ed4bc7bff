# Every target creates .venv on first use and installs the project into it.
# torch is pinned and installed first so that no CUDA wheels are pulled on CPU machines.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

# make shards [MANIFEST=...] [SHARDS=...] [TOKENIZER=...] [WORKERS=...]
CORPUS    ?= data/demo_corpus
MANIFEST  ?= $(CORPUS)/manifest.jsonl
SHARDS    ?= data/shards
TOKENIZER ?= patch-kmeans
WORKERS   ?= 2
SEED      ?= 0

.PHONY: venv test demo shards corpus bench lint clean

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
	@if [ "$(MANIFEST)" = "$(CORPUS)/manifest.jsonl" ] && [ ! -f "$(MANIFEST)" ]; then \
		$(PY) data_prep/synth_corpus.py --out $(CORPUS) --seed $(SEED); fi

shards: venv corpus
	$(PY) data_prep/make_shards.py --manifest $(MANIFEST) --out $(SHARDS) \
		--tokenizer $(TOKENIZER) --workers $(WORKERS) --seed $(SEED)

demo: venv
	$(PY) -m lvm.demo --corpus $(CORPUS) --shards $(SHARDS) --seed $(SEED)

bench: venv
	set -e; for b in bench/bench_*.py; do $(PY) $$b; done

lint: venv
	$(PY) -m ruff check src data_prep launch tests bench

clean:
	rm -rf data runs
