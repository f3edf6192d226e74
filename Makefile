# Entry points; README.md explains them.
.PHONY: setup test lint demo up down

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

up: setup
	$(VENV)/bin/kubelm-dev up

down:
	$(VENV)/bin/kubelm-dev down
