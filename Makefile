# agentloop: `make run` serves, `make test` runs every check. Both set up what they need.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
NODE_BIN := node_modules/.bin
PROTOS := $(wildcard protos/agentloop/v1/*.proto)
GEN_DIR := server/agentloop/v1
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test lint generate docs bench clean

help:
	@echo "make run       set up and serve on 127.0.0.1:50051 (Ollama if reachable, else embedded)"
	@echo "make test      set up and run every check (lint + tests)"
	@echo "make generate  regenerate the Python stubs from protos/"
	@echo "make docs      rewrite the README settings table from config.py"
	@echo "make lint      buf lint + buf format + ruff"
	@echo "make bench     run the benchmarks (writes bench/results/)"

# The venv, with the server, its embedded engine and the dev tools. The stamp tracks
# pyproject.toml so a changed dependency list reinstalls. llama-cpp-python builds from
# source the first time (about 6 minutes on 2 cores); pip caches the wheel after that.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	touch $@

# Envoy's protos for tests/test_mesh.py, in a folder of their own that only the subprocess
# parsing k8s/affinity/envoy.yaml puts on its path: the xds-protos wheel also carries
# opentelemetry.proto and google.* modules of other versions, which would replace the
# server's own if installed into the venv.
XDS_PROTOS := $(VENV)/xds-protos
$(XDS_PROTOS)/.installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(XDS_PROTOS) 'xds-protos==1.85.0'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed node_modules/.installed $(XDS_PROTOS)/.installed

run: $(VENV)/.installed
	$(BIN)/agentloop serve

generate: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I protos --python_out=server --pyi_out=server \
		--grpc_python_out=server $(PROTOS)

docs: $(VENV)/.installed
	$(PY) -c "from agentloop.config import update_readme; update_readme('README.md')"

lint: install
	$(NODE_BIN)/buf lint
	$(NODE_BIN)/buf format --exit-code --diff
	$(BIN)/ruff check server clients tests bench

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,embedded,bench]'
	touch $@

bench: install $(VENV)/.bench-installed
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
