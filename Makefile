# Every target installs what it needs into .venv first; nothing is installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-all bench ui clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
ifeq ($(ARCH),x86_64)
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
else
	$(BIN)/pip install torch==2.9.1 torchvision==0.24.1
endif
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/meddiffaug demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

ui: $(STAMP)
	$(BIN)/meddiffaug ui

clean:
	rm -rf outputs artifacts .pytest_cache
