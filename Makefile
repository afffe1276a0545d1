# The two commands: `make up` (a local cloud, left running) and `make test` (every test tier this
# machine supports). Both install what a fresh machine lacks: Debian packages, uv and the locked
# Python environment, and the Go-built kube-apiserver/kubectl/etcd/helm (cached in ~/.cache/cumulo).

SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.13.9
CACHE ?= $(HOME)/.cache/cumulo
UV := $(CACHE)/uv-$(UV_VERSION)/bin/uv
VENV := .venv
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export CUMULO_CACHE := $(CACHE)

.PHONY: up down test deps system-deps python toolchain crds lint bench bench-scale chaos

up: deps
	$(VENV)/bin/cumulo up

down:
	@if [ -x $(VENV)/bin/cumulo ]; then $(VENV)/bin/cumulo down; else echo "nothing is running"; fi

test: deps lint
	$(VENV)/bin/pytest

deps: system-deps python toolchain

# Benchmarks (benchmarks/*.py; figures appended to BENCHMARKS.md). The quick set takes a few minutes;
# bench-scale runs the issue's full size unless SCALE_ARGS says otherwise (e.g. --hosts 200 --vms 2000).
SCALE_ARGS ?=
bench: deps
	$(VENV)/bin/python benchmarks/burst.py
	$(VENV)/bin/python benchmarks/api_writes.py
	$(VENV)/bin/python benchmarks/planner_throughput.py
	$(VENV)/bin/python benchmarks/real_guest.py

bench-scale: deps
	$(VENV)/bin/python benchmarks/scale.py $(SCALE_ARGS)
	$(VENV)/bin/python benchmarks/ha.py

# Crash safety: the fault-injection harness (benchmarks/chaos.py) over many seeds; CI runs seed 8
# (tests/integration/test_chaos.py). Each seed takes 2-4 minutes here.
CHAOS_ARGS ?= --seeds 1-50
chaos: deps
	$(VENV)/bin/python benchmarks/chaos.py $(CHAOS_ARGS)

system-deps:
	hack/install-system-deps

$(UV):
	$(PYTHON) -m venv $(CACHE)/uv-$(UV_VERSION)
	$(CACHE)/uv-$(UV_VERSION)/bin/pip install --quiet uv==$(UV_VERSION)

python: $(UV)
	$(UV) sync --frozen --all-extras --quiet
	hack/link-system-python $(VENV)

toolchain: python
	$(VENV)/bin/cumulo toolchain

crds: python
	$(VENV)/bin/cumulo crds

lint: python
	$(VENV)/bin/cumulo crds --check
	$(VENV)/bin/lint-imports
