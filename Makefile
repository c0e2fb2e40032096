# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast bench pretrain lint format clean

# torch and torchvision are installed first, pinned, so that pip takes the releases this
# project is tested with instead of resolving (and downloading) another build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[ml,core,api,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m bench.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not e2e"

bench: setup
	$(PY) -m bench.adaptation

pretrain: setup
	$(PY) -m bench.tiny_clip.pretrain

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf .demo runs .pytest_cache .ruff_cache
