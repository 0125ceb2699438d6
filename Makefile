# agentloop: `make run` serves, `make test` runs every check. Both set up what they need.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
NODE_BIN := node_modules/.bin
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test lint generate docs monitoring bench clean go-tools go-check \
	prometheus-tools postgres-tools

help:
	@echo "make run       set up and serve on 127.0.0.1:50051 (Ollama if reachable, else embedded)"
	@echo "make test      set up and run every check (lint + tests)"
	@echo "make generate  regenerate the server's and the client's Python stubs from protos/"
	@echo "make docs      rewrite the settings table (docs/settings.md) from config.py"
	@echo "make monitoring render the alert rules and the dashboard (k8s/monitoring/) from slo.yaml"
	@echo "make lint      buf lint + buf format + ruff"
	@echo "make bench     run the benchmarks (writes bench/results/)"
	@echo "make go-check  generate the Go stubs and compile them (Debian's Go packages)"

# llama-cpp-python builds llama.cpp from source. pip's default build is native: it uses every
# instruction the build machine has, AMX included, and on an AMX machine the engine dies with
# SIGSEGV in ggml's CPU backend at its first decode. So it is built without -march=native,
# with the x86-64 extensions this machine has (AVX2 always, AVX-512 where present) and never
# AMX. The wheel is kept outside the clone under a name of its version and flags, so that a
# fresh clone (CI) installs it again without building; pip prefers it to the sdist.
LLAMA_CPP_VERSION := 0.3.36
CPU_FLAGS := $(shell grep -m1 -o -w -E 'avx512(f|bw|vl|dq|cd|vbmi|_vnni|_bf16)|avx_vnni' /proc/cpuinfo 2>/dev/null)
AVX512 := $(and $(filter avx512f,$(CPU_FLAGS)),$(filter avx512bw,$(CPU_FLAGS)),$(filter avx512vl,$(CPU_FLAGS)),$(filter avx512dq,$(CPU_FLAGS)),$(filter avx512cd,$(CPU_FLAGS)))
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF $(if $(filter avx_vnni,$(CPU_FLAGS)),-DGGML_AVX_VNNI=ON) \
	$(if $(AVX512),-DGGML_AVX512=ON $(if $(filter avx512vbmi,$(CPU_FLAGS)),-DGGML_AVX512_VBMI=ON) \
	$(if $(filter avx512_vnni,$(CPU_FLAGS)),-DGGML_AVX512_VNNI=ON) \
	$(if $(filter avx512_bf16,$(CPU_FLAGS)),-DGGML_AVX512_BF16=ON))
LLAMA_WHEEL_LINK = --find-links $(LLAMA_WHEELS)
LLAMA_WHEELS := $(HOME)/.cache/agentloop/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell echo '$(strip $(LLAMA_CMAKE_ARGS))' | md5sum | cut -c1-10)

# The venv, with the client and the server (each its own distribution; the server's CLI
# depends on the client), the embedded engine and the dev tools. The stamp tracks
# pyproject.toml so a changed dependency list reinstalls. llama-cpp-python builds from
# source the first time (about 6 minutes on 2 cores); pip caches the wheel after that.
# pip runs without --quiet for the project so that a first build shows its progress.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "Installing agentloop and its dependencies into $(VENV). The first time, pip builds"
	@echo "llama-cpp-python from source: about 6 minutes on 2 cores at \"Building wheel for";
	@echo "llama-cpp-python\" below;"
	@echo "later installs reuse that wheel ($(LLAMA_WHEELS))."
	test -n "$$(ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl 2>/dev/null)" || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --no-deps --no-cache-dir \
		--progress-bar on -w $(LLAMA_WHEELS) 'llama-cpp-python==$(LLAMA_CPP_VERSION)'
	$(PY) -m pip install --progress-bar on $(LLAMA_WHEEL_LINK) -e clients/python -e '.[dev,embedded]'
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
	$(PY) protos/generate.py

# SETTINGS_DOC: the Markdown file whose settings markers `make docs` fills.
SETTINGS_DOC ?= docs/settings.md
docs: $(VENV)/.installed
	$(PY) -m agentloop.settings_doc $(SETTINGS_DOC)

# Alert rules (plain and PrometheusRule) and the Grafana dashboard, from k8s/monitoring/slo.yaml
# (tests/test_alerts.py fails while they are stale).
monitoring: $(VENV)/.installed
	$(PY) k8s/monitoring/render.py

lint: install
	$(NODE_BIN)/buf lint
	$(NODE_BIN)/buf format --exit-code --diff
	$(BIN)/ruff check server clients tests bench protos

test: install lint go-tools prometheus-tools postgres-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# Go stubs (buf.gen.go.yaml): Debian packages the Go toolchain, both protoc plugins and the
# protobuf and gRPC Go libraries. Installed here when apt-get can (as root); otherwise the
# Go test (tests/test_buf.py) is skipped and says why.
# (gRPC's codec needs github.com/golang/protobuf 1.4 or later: the 1-5 package.)
GO_PACKAGES := golang-go protoc-gen-go protoc-gen-go-grpc golang-google-protobuf-dev \
	golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev
go-tools:
	@if dpkg -s $(GO_PACKAGES) >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq --no-install-recommends $(GO_PACKAGES) \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(GO_PACKAGES); } \
		|| echo "go-tools: apt-get could not install $(GO_PACKAGES); the Go test is skipped"; \
	else echo "go-tools: no apt-get as root; the Go test is skipped"; fi

# promtool (rule unit tests) and the Prometheus server (the live alert check) from Debian's
# prometheus package, installed like the Go packages above; without them tests/test_alerts.py
# skips those tests and says why. --no-install-recommends: no node exporter. (Where systemd
# runs, Debian also enables its prometheus service on :9090; the tests start their own.)
PROMETHEUS_PACKAGES := prometheus
prometheus-tools:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq --no-install-recommends $(PROMETHEUS_PACKAGES) \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(PROMETHEUS_PACKAGES); } \
		|| echo "prometheus-tools: apt-get could not install $(PROMETHEUS_PACKAGES); the alert tests are skipped"; \
	else echo "prometheus-tools: no apt-get as root; the alert tests are skipped"; fi

# PostgreSQL (initdb, pg_ctl, the server) from Debian's postgresql package, installed like the
# packages above; the run store's tests start their own server in a temporary directory as
# the `postgres` user the package creates, and skip, saying why, without it.
# (Where systemd runs, Debian also starts its own cluster on :5432; the tests do not use it.)
POSTGRES_PACKAGES := postgresql
postgres-tools:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq --no-install-recommends $(POSTGRES_PACKAGES) \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(POSTGRES_PACKAGES); } \
		|| echo "postgres-tools: apt-get could not install $(POSTGRES_PACKAGES); the PostgreSQL tests are skipped"; \
	else echo "postgres-tools: no apt-get as root; the PostgreSQL tests are skipped"; fi

go-check: install go-tools
	$(PY) -m pytest -q tests/test_buf.py -k go

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e clients/python -e '.[dev,embedded,bench]'
	touch $@

bench: install $(VENV)/.bench-installed
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
