# canaryd: `make demo` and `make test` work on a fresh machine (Go, Python 3.11 and apt needed).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all test unit integration lint typecheck venv binaries prometheus demo bench bench-smoke clean devstack-up devstack-down

all: test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

binaries:
	bash hack/build-binaries.sh >/dev/null

prometheus:
	bash hack/install-prometheus.sh

lint: venv
	$(VENV)/bin/ruff check canaryd tests $(wildcard bench)
	$(VENV)/bin/mypy

typecheck: lint

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: venv binaries prometheus
	$(VENV)/bin/pytest -q tests/integration

test: venv binaries prometheus lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

demo: venv binaries prometheus
	$(VENV)/bin/canaryd demo

bench: venv binaries prometheus
	$(PY) -m bench.run --full

bench-smoke: venv binaries prometheus
	$(PY) -m bench.run --smoke

devstack-up: venv binaries prometheus
	$(VENV)/bin/canaryd devstack up --dir .devstack

devstack-down:
	$(VENV)/bin/canaryd devstack down --dir .devstack

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
