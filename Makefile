# copyfree: the one entry point for people and CI. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEV_IMAGES ?= ../shared/datasets/dev
STAMP := $(VENV)/.installed

.PHONY: help setup setup-train demo serve test test-fast lint fmt protos protos-check \
        k8s models clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "copyfree needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml setup.py src/copyfree/_scan.c | $(VENV)/bin/python
	$(PIP) install -q -e '.[encoder,index,gateway,dev]'
	touch $@

setup: $(STAMP) ## venv with the services and dev tools (no torch)

$(VENV)/.installed-train: $(STAMP)
	# torch==2.13.0 is pinned in the train extra: the CPU wheel, never a CUDA build.
	$(PIP) install -q -e '.[encoder,index,gateway,dev,train]'
	touch $@

setup-train: $(VENV)/.installed-train ## + training (PyTorch 2.13.0 CPU, onnx, matplotlib)

demo: setup ## start everything, register real images, check three, print verdicts, stop
	$(VENV)/bin/copyfree demo --images $(DEV_IMAGES)

serve: setup ## run encoder + 2 index shards + gateway + embedded Redis until Ctrl-C
	$(VENV)/bin/copyfree serve --shards 2

test: setup-train ## the whole test suite (unit, integration with real Redis, e2e, training)
	$(PY) -m pytest -q

test-fast: setup ## everything except training tests
	$(PY) -m pytest -q -m 'not torch'

lint: setup ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: setup ## ruff format + fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: setup ## regenerate src/copyfree/v1 from protos/
	$(PY) -m grpc_tools.protoc -I protos --python_out=src --grpc_python_out=src \
	  --pyi_out=src protos/copyfree/v1/*.proto

protos-check: protos ## fail if the generated code is not current
	git diff --exit-code -- src/copyfree/v1

k8s: ## render every kustomize overlay
	for o in deploy/k8s/overlays/*/; do kubectl kustomize $$o > /dev/null && echo "ok $$o"; done

LOAD_DURATION ?= 15
.PHONY: load
load: setup ## load-test Check at c=1,8,32 vs encoder+index direct (local stack, models/)
	$(VENV)/bin/copyfree load --stack --images $(DEV_IMAGES) --call check,direct-check \
	  --concurrency 1,8,32 --duration $(LOAD_DURATION) --json artifacts/load.json

.PHONY: load-pinned
load-pinned: setup ## the same, with the gateway and client on CPU 1, the backend on CPU 0 (taskset)
	bash benchmarks/load_pinned.sh $(DEV_IMAGES)

.PHONY: eval-retrieve
eval-retrieve: setup-train ## retrieval report: TBH+sim vs TBH vs LSH/ITQ/pHash, 16/32/64 bits (trains missing runs)
	$(VENV)/bin/copyfree eval retrieve --images $(DEV_IMAGES) --out artifacts/retrieve/eval \
	  --cache-dir artifacts/retrieve/features --figures docs/img

.PHONY: eval-detect
eval-detect: setup-train ## detection report: attack suite, 1:N via the index, vs pHash/PDQ/deep (~8 min cold)
	$(VENV)/bin/copyfree eval detect --images $(DEV_IMAGES) --out artifacts/detect/eval \
	  --cache-dir artifacts/detect/cache --figures docs/img

models: setup-train ## retrain and export the shipped bundles on $(DEV_IMAGES) (slow on CPU)
	bash scripts/make_models.sh $(DEV_IMAGES)

.PHONY: bench bench-index
BENCH_INDEX_ARGS ?=

bench-index: setup ## index vs faiss: search, memory, ingest, reload (N = 1M, 10M; ~25 min)
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/bench_index.py $(BENCH_INDEX_ARGS)

bench: bench-index ## every benchmark (results in docs/benchmarks.md)

clean: ## remove caches and local state (keeps models/)
	rm -rf .pytest_cache .ruff_cache .copyfree artifacts
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
