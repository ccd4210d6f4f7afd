# Quick start:  make bench  |  make test
# Both set up .venv on first use: torch, then this project (building the CUDA extension dla_fast._C
# where nvcc is found) with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup bench verify test clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q torch numpy
	$(PY) -m pip install --no-build-isolation -e ".[test,bench]"
	touch $@

setup: $(VENV)/.installed

bench: setup
	$(PY) -m dla_fast bench

verify: setup
	$(PY) -m dla_fast verify

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info dla_fast/_C*.so
