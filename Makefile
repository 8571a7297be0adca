# rayship: `make demo` runs the main job, `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: this exact pin takes the CPU wheel; a looser one pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python examples/make_csv.py
	$(BIN)/rayship run examples/digits.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/python examples/make_csv.py
	$(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/trial_overhead.py --out benchmarks/results/trial_overhead.json

clean:
	rm -rf $(VENV) .rayship
