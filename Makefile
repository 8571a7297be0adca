# rayship: `make demo` runs the main job, `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean kind-up minikube-up k8s-deploy k8s-down bench-serving bench-soak

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

# Search benchmarks (benchmarks/RESULTS.md): `make bench` (full, repeats) or
# `make bench QUICK=1` (smaller cases, one run each; results under benchmarks/results/quick).
BENCH_MODE := $(if $(QUICK),--quick,)
BENCH_RESULTS := benchmarks/results$(if $(QUICK),/quick,)

bench: setup
	$(BIN)/python benchmarks/overhead.py $(BENCH_MODE)
	$(BIN)/python benchmarks/tuning.py $(BENCH_MODE)
	$(BIN)/python benchmarks/scaling.py $(BENCH_MODE)
	$(BIN)/python benchmarks/search_report.py --results $(BENCH_RESULTS)

# Serving benchmark (benchmarks/serving.py; ARGS=--quick for a smoke run). BentoML gets
# its own venv: installed beside Ray Serve it would change versions Serve needs. 1.4.39:
# 1.4.40 requires a certifi newer than the package index here serves.
BENTO_VENV := benchmarks/.venv-bentoml
BENTO_STAMP := $(BENTO_VENV)/.installed

$(BENTO_STAMP): | $(STAMP)
	test -x $(BENTO_VENV)/bin/python || $(PYTHON) -m venv $(BENTO_VENV)
	$(BENTO_VENV)/bin/pip install --quiet --upgrade pip
	$(BENTO_VENV)/bin/pip install --quiet torch==2.13.0
	$(BENTO_VENV)/bin/pip install --quiet bentoml==1.4.39 \
		scikit-learn==$$($(BIN)/python -c 'import sklearn; print(sklearn.__version__)') \
		numpy==$$($(BIN)/python -c 'import numpy; print(numpy.__version__)')
	touch $(BENTO_STAMP)

bench-serving: setup $(BENTO_STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) \
		|| echo "no wrk: the Python load generator of benchmarks/serving_load.py is used"
	$(BIN)/python benchmarks/serving.py $(ARGS)

# Soak (benchmarks/soak.py): an open-loop constant 70% of the endpoint's measured capacity
# for 10 minutes with a promote half-way; fails unless nothing was lost and the memory of
# every Serve process stayed within 10%. ARGS=--quick for a 1-minute smoke run.
bench-soak: setup
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python benchmarks/soak.py $(ARGS)

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
