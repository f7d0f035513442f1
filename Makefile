# `make search` creates .venv and installs what a search needs on first use; `make test` adds the test tools.
PY      := .venv/bin/python
# torch, Ray, Optuna, timm...: what search, app, bench and gpu-check run on
RUNTIME := .venv/.runtime
# the runtime plus the test extra (pytest, playwright, moto, ...): only `make test` needs it
STAMP   := .venv/.installed
# the runtime plus the bench extra (psutil, for the memory measurements)
BENCH   := .venv/.bench
ARGS    ?=

.PHONY: search test bench duel app gpu-check clean-venv

# constraints.txt pins every package to the versions the tests and benchmarks ran on (pyproject.toml's ranges
# are what works): a registry's newer numerics change TPE's draws, which the golden tests pin.
$(RUNTIME): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

$(BENCH): $(RUNTIME)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	touch $(BENCH)

search: $(RUNTIME)
	$(PY) run_search.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

RUNS ?= runs
PORT ?= 8501
app: $(RUNTIME)
	$(PY) app.py --root $(RUNS) --port $(PORT)

bench: $(BENCH)
	$(PY) benchmarks/bench.py $(ARGS)

# the search against the hand-made recipes at equal budget, over seeds (one seed's (d) and (a) at 1x: about 30 min at --subset 10 on a quiet 2-core machine); prints its table for BENCHMARKS.md
duel: $(RUNTIME)
	$(PY) benchmarks/duel.py $(ARGS)

# run first on new GPU hardware: per GPU a 224 px fine-tune epoch, resume, throughput; two trials
# sharing a GPU; one PASS/FAIL line per check (says so and exits 0 without a GPU)
gpu-check: $(RUNTIME)
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean-venv:
	rm -rf .venv
