# Every target sets itself up: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-own-brokers unit lint bench bench-e2e clean

$(STAMP): pyproject.toml plugins/examples/webhook/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
	$(BIN)/python -m pip install --quiet ./plugins/examples/webhook
	touch $(STAMP)

## the zero-setup demo: simulator + bridge + console sink, live prices, Ctrl-C to stop
demo: $(STAMP)
	$(BIN)/aleno-bridge demo

## the whole test suite; brokers are found running or started by the tests themselves
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## what a fresh machine does: ignore brokers already running, start our own
test-own-brokers: $(STAMP)
	ALENO_BRIDGE_TEST_OWN_BROKERS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## every test that needs no broker, socket or subprocess (drivers included), in seconds:
## everything not marked `integration` in tests/unit and tests/drivers
unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m 'not integration' tests/unit tests/drivers $(PYTEST_ARGS)

## ruff, and mypy --strict over bridge/ and plugins/ (files in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check bridge plugins tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

## end to end (simulator -> bridge -> Kafka/NATS/MQTT -> consumers) vs the raw clients,
## private brokers on free ports; < 10 min on 2 cores (docs/benchmarks.md)
bench-e2e: $(STAMP)
	$(BIN)/python bench/e2e.py $(BENCH_ARGS)

## the container image (docs/image.md). The engine is CONTAINER_ENGINE, else docker if its
## daemon answers, else podman; PYTHON_IMAGE, IMAGE_NAME, PIP_CERT, PIP_INDEX_URL and
## IMAGE_BUILD_ARGS (e.g. --network host) come from the environment or the command line.
.PHONY: base-image image test-image dist

## a Python base image from Debian packages (mmdebstrap), for networks without a registry
base-image:
	scripts/image/base-image.sh

## aleno-bridge:<version>; prints its size, what it adds to the base and the build time
image:
	scripts/image/build.sh

## build (layers cached: a reuse when nothing changed) and check the image with the engine
test-image: $(STAMP) image
	$(BIN)/python -m pytest -q -p no:cacheprovider scripts/image/test_image.py $(PYTEST_ARGS)

## the wheel and the sdist in dist/ (python -m build)
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) build *.egg-info
