# sam-repro: the two commands that matter are `make demo` and `make test`; both set themselves up.
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

.PHONY: setup data demo test test-all bench wheelhouse gpu-check clean-runs cluster-up cluster-down help

help:
	@echo "make demo      SGD vs SAM on real CIFAR-10, sized for a GPU or a CPU, whichever is here (DEMO=cpu|gpu)"
	@echo "make test      fast test suite (sets everything up)"
	@echo "make test-all  every test, slow ones included"
	@echo "make bench     benchmarks under benchmarks/ (results in benchmarks/results/)"
	@echo "make wheelhouse  wheels of every dependency but PyTorch, for an offline install (WHEEL_PY=, WHEEL_PLATFORM=)"
	@echo "make gpu-check   the GPU acceptance run (benchmarks/gpu_check.py; needs only PyTorch)"

setup: $(STAMP)

# The tested versions come from constraints.txt; in a venv that already sees a PyTorch in range (made with
# --system-site-packages over a node's PyTorch, say) its PyTorch block is left out, so that PyTorch stays.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python scripts/deps.py constraints $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

data: $(CIFAR10_READY)

$(CIFAR10_READY): | $(STAMP)
	$(BIN)/sam-data cifar10

demo: $(STAMP) $(CIFAR10_READY)
	$(BIN)/python scripts/demo.py --profile $(DEMO)

# pytest exits 5 when it collects no tests: report it and count it as success rather than an obscure failure.
test: $(STAMP) $(CIFAR10_READY)
	$(BIN)/pytest -m "not slow" -q; rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; rc=0; }; exit $$rc

test-all: $(STAMP) $(CIFAR10_READY)
	$(BIN)/pytest -q; rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected"; rc=0; }; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/sam_overhead.py

wheelhouse:
	$(PY) scripts/deps.py wheelhouse --dest wheelhouse --python-version $(WHEEL_PY) --platform $(WHEEL_PLATFORM)

gpu-check:
	$(PY) benchmarks/gpu_check.py

cluster-up:
	bash scripts/slurm/local_cluster.sh up

cluster-down:
	bash scripts/slurm/local_cluster.sh down

clean-runs:
	rm -rf outputs multirun
