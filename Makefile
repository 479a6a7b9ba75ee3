# canaryd: `make demo` and `make test` work on a fresh machine (Go, Python 3.11 and apt needed).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all test unit integration lint typecheck venv binaries prometheus demo bench bench-smoke bench-judge bench-vs-flagger bench-shards chaos wheel-check clean devstack-up devstack-down image image-test

all: test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The devkit (devstack, demo, bench) is not in the wheel: the checkout's venv imports it from here.
	$(PY) -c 'import site, sys; open(site.getsitepackages()[0] + "/canaryd-devkit.pth", "w").write(sys.argv[1] + "\n")' "$(CURDIR)"
	touch $@

venv: $(VENV)/.installed

binaries:
	bash hack/build-binaries.sh >/dev/null

prometheus:
	bash hack/install-prometheus.sh

lint: venv
	$(VENV)/bin/ruff check canaryd devkit tests
	$(VENV)/bin/ruff format --check canaryd devkit tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

typecheck: lint

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: venv binaries prometheus
	$(VENV)/bin/pytest -q tests/integration

# Two workers (pytest-xdist), each with its own devstack and Prometheus; a file's tests stay on one worker.
# TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: venv binaries prometheus lint
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=12 -n $(TEST_WORKERS) --dist loadfile tests

demo: venv binaries prometheus
	$(VENV)/bin/canaryd demo

bench: venv binaries prometheus
	$(PY) -m devkit.bench.run --full

bench-smoke: venv binaries prometheus
	$(PY) -m devkit.bench.run --smoke

# canaryd against Flagger (built from its Go module by hack/build-flagger.sh, never by make test)
# on one devstack; docs/benchmarks.md "canaryd vs Flagger". About an hour; --sizes 1 for a smoke run.
bench-vs-flagger: venv binaries prometheus
	$(PY) -m devkit.bench.vs_flagger --sizes 1,100,1000

# 2,500 / 5,000 / 10,000 staggered routes over 4 `canaryd run --shards 4` daemons (docs/benchmarks.md, "Shards").
bench-shards: venv binaries prometheus
	$(PY) -m devkit.bench.shards --routes 2500 5000 10000 --shards 4

bench-judge: venv
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m devkit.bench.judge_sim

devstack-up: venv binaries prometheus
	$(VENV)/bin/canaryd devstack up --dir .devstack

devstack-down:
	$(VENV)/bin/canaryd devstack down --dir .devstack

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

chaos: venv binaries prometheus
	$(PY) -m devkit.chaos.run

# The container image from ./Dockerfile with buildah, on a base made from Debian's packages
# (hack/build-image.sh; installs buildah/debootstrap with apt-get when missing). docs/image.md.
image:
	bash hack/build-image.sh

# The image's entrypoint against a devstack as the chart's Pod (read-only root, in-cluster config):
# a rollout to Promoted and an abort to RolledBack. Minutes, not part of `make test`.
image-test: venv binaries image
	$(PY) -m devkit.image_test
