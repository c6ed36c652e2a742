# sam-repro: `make help` lists the targets. Every target that runs code first makes sure the
# virtual environment in .venv exists and matches pyproject.toml (it is reused when it does).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUNS ?= results/runs
TABLES ?= results/tables
BENCH_OUT ?= results/bench

.DEFAULT_GOAL := help
.PHONY: help install test test-fast mutate table sharpness bench bench-gpu gpu smoke clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev,launchers]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install sam-repro with its test and launcher extras

test: install ## install, then run the whole test suite on the CPU
	$(PY) -m pytest -q

test-fast: install ## the suite without the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

# `make mutate` mutates every module in [tool.mutmut] only_mutate (pyproject.toml: the modules that
# decide numbers) and re-tests each mutant; run again, it re-tests only the functions that changed.
# `make mutate MUTATE=sam_repro.validate` checks one module (or several, space-separated); an entry
# with a `*` is passed as it is (`sam_repro.report.x*`: report/__init__.py's own functions).
# Not part of `make test` (docs/testing.md).
MUTATE ?=
MUTATE_ARGS = $(foreach m,$(MUTATE),"$(m)$(if $(findstring *,$(m)),,.*)")
mutate: install ## mutation testing (mutmut) of the modules that decide numbers (18,024 mutants: ~75 min on 2 cores); summary to results/mutation/
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e ".[dev,launchers,mutate]"
	set -o pipefail; OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(MUTATE_ARGS) | grep -av '^🎉'
	$(PY) scripts/mutation_summary.py --out results/mutation --label summary

table: install ## regenerate results/tables/ (markdown, CSV, plots) from the run logs in results/runs/
	$(VENV)/bin/sam-report --runs $(RUNS) --out $(TABLES)

sharpness: install ## measure every run below $(RUNS) that has a checkpoint and no sharpness.json (sam-sharpness)
	$(VENV)/bin/sam-sharpness --runs $(RUNS) --missing-only $(SHARPNESS_ARGS)

smoke: install ## a 20-second CPU training run on synthetic data (writes runs/smoke/...)
	$(VENV)/bin/sam-train experiment=smoke

bench: install ## CPU benchmark of one training step: SGD vs fused SAM vs a per-parameter-loop SAM
	$(PY) scripts/bench_step.py --device cpu

bench-gpu: ## GPU benchmarks (step, end-to-end engine, packed runs); run on a GPU machine, results to results/bench/
	python3 scripts/bench_step.py --device cuda --suite gpu --out $(BENCH_OUT)
	python3 scripts/bench_engine.py --device cuda --out $(BENCH_OUT)
	python3 scripts/bench_pack.py --device cuda --out $(BENCH_OUT)

GPU_BUDGET ?= 540
gpu: ## one short GPU session in GPU_BUDGET seconds (540): CUDA checks, short benchmarks, Table 4 at one seed (scripts/gpu.sh)
	bash scripts/gpu.sh $(GPU_BUDGET)

clean: ## remove the virtual environment and caches (keeps runs/ and results/)
	rm -rf $(VENV) .pytest_cache build *.egg-info mutants
