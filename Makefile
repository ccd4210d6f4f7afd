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
	@# pip hides setup.py's output when the build succeeds: say here whether the CUDA extension was built
	@$(PY) -c "import dla_fast.backends.cuda as c; print('dla_fast._C: built and loaded' if c._C is not None else 'dla_fast._C: NOT built (' + str(c._load_error) + '); the Triton and eager backends run instead')"
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
