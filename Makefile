# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install dormant, run the built-in dead-neuron comparison
#   make test   create .venv, install dormant, lint (ruff), run the test suite
# and one for while you work:
#   make check  lint and the fast tests (those not marked slow): under a minute
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test check install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dormant compare --preset dying-relu --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks reproduce
	$(PY) -m pytest -q

check: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks reproduce
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/monitor_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
