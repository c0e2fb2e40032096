# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast bench pretrain lint format clean compose-check

# torch and torchvision are installed first, pinned, so that pip takes the releases this
# project is tested with instead of resolving (and downloading) another build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[ml,core,api,client,onnx,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m bench.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not e2e and not browser"

bench: setup
	$(PY) -m bench.suite

pretrain: setup
	$(PY) -m bench.tiny_clip.pretrain

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Every compose file as docker-compose reads it (`apt-get install docker-compose`; no engine needed).
# The override and the worker-node file are checked on top of what they need.
COMPOSE_CONFIG := docker-compose --env-file .env.example
compose-check:
	$(COMPOSE_CONFIG) -f docker-compose.yml config -q
	@echo "docker-compose config -q: docker-compose.yml OK"
	$(COMPOSE_CONFIG) -f docker-compose.yml -f docker-compose.cpu.yml config -q
	@echo "docker-compose config -q: docker-compose.yml + docker-compose.cpu.yml OK"
	MAIN_HOST=10.0.0.5 $(COMPOSE_CONFIG) -f deploy/compose/worker-node.yml config -q
	@echo "docker-compose config -q: deploy/compose/worker-node.yml OK"

clean:
	rm -rf .demo runs .pytest_cache .ruff_cache
