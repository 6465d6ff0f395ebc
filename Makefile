# `make test` and `make demo` each set up .venv on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pkd-installed

.PHONY: test test-all demo demo-quick bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,pretrained,yolo,detr,onnx,tune]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pkd demo

demo-quick: $(STAMP)
	$(BIN)/pkd demo --quick

# Two workers, one thread each (tests/conftest.py), a test file per worker: on 2 cores two
# one-thread processes get through the suite sooner than one with two threads.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow and not gpu"

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_losses.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
