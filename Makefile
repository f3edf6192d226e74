# Entry points; README.md explains them.
.PHONY: setup test lint demo up down bench

VENV ?= .venv
PY := $(VENV)/bin/python

setup:
	bash devcluster/scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test: setup
	bash scripts/test.sh

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/artifact_fetch.py
	$(PY) bench/operator_scale.py
	$(PY) bench/response_cache.py

up: setup
	$(VENV)/bin/kubelm-dev up

down:
	$(VENV)/bin/kubelm-dev down
