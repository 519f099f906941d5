# Every target installs what it needs into .venv first; nothing is installed by hand.
# `make` installs the exact versions in requirements.lock (compiled by pip-tools from the ranges in
# pyproject.toml under constraints.in); `make relock` refreshes the lock and runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
STAMP := $(VENV)/.installed
# Runs from any working directory: paths below are the Makefile's own folder.
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))

.PHONY: install demo test test-slow test-all bench results ui lock relock clean

$(STAMP): $(ROOT)/pyproject.toml $(ROOT)/requirements.lock
	cd $(ROOT) && (test -d $(VENV) || $(PY) -m venv $(VENV))
	cd $(ROOT) && $(BIN)/pip install --upgrade pip
ifeq ($(ARCH),x86_64)
	# The lock was compiled on x86_64 with the torch/torchvision pair of constraints.in.
	cd $(ROOT) && $(BIN)/pip install -r requirements.lock
else
	# Elsewhere (aarch64): the CPU pair for that platform, the rest of the lock as constraints (the CUDA
	# wheels left out; nvidia-ml-py, pure Python, stays for GPU system metrics).
	cd $(ROOT) && grep -vE '^(torch|torchvision|triton|nvidia-[^m])' requirements.lock > $(VENV)/lock-noarch.txt
	cd $(ROOT) && $(BIN)/pip install torch==2.9.1 torchvision==0.24.1
	cd $(ROOT) && $(BIN)/pip install -c $(VENV)/lock-noarch.txt -r $(VENV)/lock-noarch.txt
endif
	cd $(ROOT) && $(BIN)/pip install --no-deps -e .
	touch $(ROOT)/$(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(ROOT)/$(BIN)/meddiffaug demo

test: $(STAMP)
	cd $(ROOT) && $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	cd $(ROOT) && $(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	cd $(ROOT) && $(BIN)/python -m pytest -q -m "slow or not slow"

# From the committed run records (sweeps/records/), no MLflow store needed: results.md and results.json
# (block 200, pre-registered), and the archive of block 100 with its data-efficiency grid.
results: $(STAMP)
	cd $(ROOT) && $(BIN)/meddiffaug table experiments/tables/headline_block200.yaml \
		--runs sweeps/records --write results.md --json results.json
	cd $(ROOT) && $(BIN)/meddiffaug table experiments/tables/headline_by_modality.yaml \
		experiments/tables/data_efficiency.yaml --runs sweeps/records --write results_block100.md --json results_block100.json

ui: $(STAMP)
	$(ROOT)/$(BIN)/meddiffaug ui

# Re-resolve requirements.lock from pyproject.toml + constraints.in (newest allowed releases).
lock: $(STAMP)
	cd $(ROOT) && $(BIN)/pip-compile --quiet --upgrade --extra dev --extra postgres --strip-extras \
		--no-emit-index-url --no-emit-find-links -c constraints.in -o requirements.lock pyproject.toml

# Refresh the lock, install exactly it, run the fast tests: commit the lock only if they pass.
relock: lock
	$(MAKE) -C $(ROOT) test

clean:
	cd $(ROOT) && rm -rf outputs artifacts .pytest_cache
