# `make search` and `make test` create .venv and install everything on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
ARGS    ?=

.PHONY: search test bench duel app gpu-check clean-venv

# torch/torchvision are pinned to the versions this machine image carries; any torch>=2.4 works.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[test]"
	touch $(STAMP)

search: $(STAMP)
	$(PY) run_search.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m pytest -q tests

RUNS ?= runs
PORT ?= 8501
app: $(STAMP)
	$(PY) app.py --root $(RUNS) --port $(PORT)

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(ARGS)

# the search against the hand-made recipes at equal budget (~45 min on 2 CPU cores); prints its table for BENCHMARKS.md
duel: $(STAMP)
	$(PY) benchmarks/duel.py $(ARGS)

# run first on new GPU hardware: per GPU a 224 px fine-tune epoch, resume, throughput; two trials
# sharing a GPU; one PASS/FAIL line per check (says so and exits 0 without a GPU)
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean-venv:
	rm -rf .venv
