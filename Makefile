# One-command set-up: `make serve` and `make test` create .venv and install everything they need.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: serve test test-slow test-cluster test-browser test-all lint bench install dev clean readme-check grpc vendor

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is installed first and exactly: the CPU build of 2.13.0 is the one the project is tested with.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[examples]'
	touch $@

# The dev install includes the cluster extra (Ray Serve): mypy checks serving/cluster.py, make test-cluster runs it.
$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,cluster]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	$(BIN)/openmaas serve

# Two pytest workers (pytest-xdist), a test file each at a time: most tests wait on servers, model processes and
# jobs rather than compute, so two share two cores well (20.5 -> 13.6 min on a 2-core machine). TEST_WORKERS=0
# runs everything in one process.
TEST_WORKERS ?= 2

# The test servers of every suite share one-time model conversions (the bundled Gemma's: minutes of CPU each)
# through this folder, so a CI run converts it once rather than once a worker and a suite. `make test` empties it
# first: its generation tests look at a conversion in progress. (`make serve` keeps its conversions in its data dir.)
CONVERSION_CACHE ?= $(CURDIR)/build/conversion-cache
test test-slow test-cluster test-browser test-all: export OPENMAAS_CONVERSION_CACHE = $(CONVERSION_CACHE)

test: $(VENV)/.installed-dev
	rm -rf $(CONVERSION_CACHE)
	$(BIN)/python -m pytest -m "not slow and not cluster and not browser" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The slow suite (real models quantised and scored end to end); CI runs it after `make test`.
test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Cluster mode on a real two-node Ray cluster (ray.cluster_utils) with gateways on PostgreSQL and Redis; CI runs it
# after the slow suite.
test-cluster: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m cluster tests/cluster $(PYTEST_ARGS)

# The console in a real browser: Playwright driving Debian's chromium (apt-get install chromium; no browser
# download); screenshots of every page land in build/screenshots. CI runs it after the cluster suite.
test-browser: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m browser tests/browser $(PYTEST_ARGS)

test-all: $(VENV)/.installed-dev
	rm -rf $(CONVERSION_CACHE)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests scripts $(wildcard bench)
	$(BIN)/ruff format --check src tests scripts $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/lint-imports

# The gRPC messages, generated from their .proto (commit the result).
grpc: $(VENV)/.installed-dev
	cd src/openmaas/api/grpc && ../../../../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. inference.proto

# The console's vendored browser assets (htmx, Swagger UI; axe-core for the tests), fetched again from the npm
# registry at the versions their vendor.json pins (edit a version there to upgrade).
vendor:
	$(PYTHON) scripts/vendor_assets.py --refresh

# Replays the README's quick start on a fresh clone of HEAD (port 8000 must be free); CI runs it after the tests.
readme-check:
	$(PYTHON) .ci/readme_replay.py

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/serving.py --write docs/benchmarks.md
	$(BIN)/python bench/training_latency.py --append docs/benchmarks.md
	$(BIN)/python bench/generation.py --append docs/benchmarks.md
	$(BIN)/python bench/protocols.py --append docs/benchmarks.md
	$(BIN)/python bench/compression.py --append docs/benchmarks.md
	$(BIN)/python bench/compression_digits.py --append docs/benchmarks.md
	$(BIN)/python bench/batch.py --append docs/benchmarks.md
	$(BIN)/python bench/cluster.py --append docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
