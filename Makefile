# rayship: `make demo` runs the main job, `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean kind-up minikube-up k8s-deploy k8s-down

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

# Kubernetes (docs/kubernetes.md): a local cluster with the KubeRay operator and the
# image, then the manifests for SPEC (overlay OVERLAY) applied and followed.
SPEC ?= examples/breast_cancer.yaml
OVERLAY ?= local

kind-up:
	bash cluster/scripts/kind-up.sh

minikube-up:
	bash cluster/scripts/minikube-up.sh

k8s-deploy: setup
	$(BIN)/rayship deploy $(SPEC) --overlay $(OVERLAY) --watch

k8s-down:
	$(BIN)/rayship render $(SPEC) --overlay $(OVERLAY) | kubectl delete --ignore-not-found -f -
