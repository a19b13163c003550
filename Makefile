# sam-repro: the two commands that matter are `make demo` and `make test`; both set themselves up.
# `make help` lists every target: the text after `##` on a target's line is its help.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SAM_DATA_DIR ?= $(HOME)/.cache/sam_repro/data
CIFAR10_READY := $(SAM_DATA_DIR)/cifar10/prepared.npz
# `make demo` runs the GPU demo where CUDA is available and the CPU demo elsewhere; DEMO=cpu|gpu forces one.
DEMO ?= auto
# `make wheelhouse` fetches wheels for this Python and glibc 2.28+ Linux x86_64 unless told otherwise, e.g.
# `make wheelhouse WHEEL_PY=3.12 WHEEL_PLATFORM=manylinux_2_28_x86_64` for a node with Python 3.12.
WHEEL_PY ?= $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WHEEL_PLATFORM ?= manylinux_2_28_x86_64

.PHONY: help setup data demo test test-all test-versions lint format bench wheelhouse gpu-bundle gpu-check cluster-up cluster-down clean-runs

help: ## this list
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z-]*:.*## / { printf "make %-13s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install the package with its dev tools (pytest, ruff, mypy)

# The tested versions come from constraints.txt; in a venv that already sees a PyTorch in range (made with
# --system-site-packages over a node's PyTorch, say) its PyTorch block is left out, so that PyTorch stays.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python scripts/deps.py constraints $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

data: $(CIFAR10_READY) ## download, verify and cache CIFAR-10 into $SAM_DATA_DIR

$(CIFAR10_READY): | $(STAMP)
	$(BIN)/sam-data cifar10

demo: $(STAMP) $(CIFAR10_READY) ## SGD vs SAM on real CIFAR-10, sized for this machine's GPU or CPU (DEMO=cpu|gpu)
	$(BIN)/python scripts/demo.py --profile $(DEMO)

# The tiers are defined in tests/conftest.py. Every run lists each test of a second or more (--durations), so
# the split between the tiers is measured, not guessed.
DURATIONS := --durations=0 --durations-min=1
# pytest exits 5 when it collects no tests: report it and count it as success rather than an obscure failure.
test: $(STAMP) $(CIFAR10_READY) ## the fast tier: unit and in-process tests, one subprocess test per CLI (sets everything up)
	$(BIN)/pytest --fast -q $(DURATIONS); rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; rc=0; }; exit $$rc

test-all: $(STAMP) $(CIFAR10_READY) ## every tier: processes, DDP, SLURM (when up), installs, slow tests included
	$(BIN)/pytest -q $(DURATIONS); rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; rc=0; }; exit $$rc

# Not part of `test` or `test-all`: the first run makes one environment per PyTorch (about 5 GB each, from the package
# index) under ~/.cache/sam_repro/torch-tier; later runs reuse them. TORCH_VERSIONS="2.5" runs one.
TORCH_VERSIONS ?=
test-versions: ## the core tests on torch 2.5 (Python 3.11) and 2.11 (3.12), cached envs; results/torch_versions/
	$(PY) scripts/torch_versions.py $(TORCH_VERSIONS)

lint: $(STAMP) ## ruff (lint rules, formatting) and mypy (types), checked, nothing changed (settings in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## ruff: apply the safe lint fixes (import order, ...), then format every file
	$(BIN)/ruff check --fix --exit-zero .
	$(BIN)/ruff format .

bench: $(STAMP) ## SAM's step time over SGD's (benchmarks/sam_overhead.py; results in benchmarks/results/)
	$(BIN)/python benchmarks/sam_overhead.py

wheelhouse: ## wheels of every dependency but PyTorch, for an offline install (WHEEL_PY=3.12 WHEEL_PLATFORM=...)
	$(PY) scripts/deps.py wheelhouse --dest wheelhouse --python-version $(WHEEL_PY) --platform $(WHEEL_PLATFORM)

# `make gpu-bundle` writes gpu-bundle/ (at most 60 MiB): wheels for a Python 3.12 node, a CIFAR-10 export of
# BUNDLE_TRAIN + BUNDLE_TEST images, the CUDA tier's tests and run.sh; on the node: cd gpu-bundle && ./run.sh
BUNDLE_TRAIN ?= 10000
BUNDLE_TEST ?= 2000
gpu-bundle: $(STAMP) $(CIFAR10_READY) ## gpu-bundle/: what a GPU node with PyTorch, numpy and timm runs offline (docs/gpu_check.md)
	$(BIN)/python scripts/gpu_bundle.py --dest gpu-bundle --train $(BUNDLE_TRAIN) --test $(BUNDLE_TEST)

gpu-check: ## the GPU acceptance run (benchmarks/gpu_check.py; needs only PyTorch)
	$(PY) benchmarks/gpu_check.py

cluster-up: ## start the local single-node SLURM cluster the `slurm` tests run on
	bash scripts/slurm/local_cluster.sh up

cluster-down: ## stop the local SLURM cluster
	bash scripts/slurm/local_cluster.sh down

clean-runs: ## remove Hydra's outputs/ and multirun/ folders (never runs/)
	rm -rf outputs multirun
