# sam-repro: the two commands that matter are `make demo` and `make test`; both set themselves up.
# `make help` lists every target: the text after `##` on a target's line is its help.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SAM_DATA_DIR ?= $(HOME)/.cache/sam_repro/data
CIFAR10_READY := $(SAM_DATA_DIR)/cifar10/prepared.npz

.PHONY: help setup data demo test test-all lint format bench cluster-up cluster-down clean-runs

help: ## this list
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z-]*:.*## / { printf "make %-13s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install the package with its dev tools (pytest, ruff)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

data: $(CIFAR10_READY) ## download, verify and cache CIFAR-10 into $SAM_DATA_DIR

$(CIFAR10_READY): | $(STAMP)
	$(BIN)/sam-data cifar10

demo: $(STAMP) $(CIFAR10_READY) ## SGD vs SAM on real CIFAR-10, sized for a CPU (sets everything up)
	$(BIN)/python scripts/demo.py

# pytest exits 5 when it collects no tests: report it and count it as success rather than an obscure failure.
test: $(STAMP) $(CIFAR10_READY) ## the fast test suite, `pytest -m "not slow"` (sets everything up)
	$(BIN)/pytest -m "not slow" -q; rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; rc=0; }; exit $$rc

test-all: $(STAMP) $(CIFAR10_READY) ## every test, slow ones included
	$(BIN)/pytest -q; rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; rc=0; }; exit $$rc

lint: $(STAMP) ## ruff: lint rules and formatting checked, nothing changed (settings in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff: apply the safe lint fixes (import order, ...), then format every file
	$(BIN)/ruff check --fix --exit-zero .
	$(BIN)/ruff format .

bench: $(STAMP) ## SAM's step time over SGD's (benchmarks/sam_overhead.py; results in benchmarks/results/)
	$(BIN)/python benchmarks/sam_overhead.py

cluster-up: ## start the local single-node SLURM cluster the `slurm` tests run on
	bash scripts/slurm/local_cluster.sh up

cluster-down: ## stop the local SLURM cluster
	bash scripts/slurm/local_cluster.sh down

clean-runs: ## remove Hydra's outputs/ and multirun/ folders (never runs/)
	rm -rf outputs multirun
