# Two entry points for a fresh machine with Python 3.11+: `make demo` and `make test` (and `make bench`).
# Each creates .venv and installs what it needs (pinned by constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m simulations.demo --run-dir $(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# Every benchmark at the demo's and LiQA's size vs its baseline -> docs/benchmarks.md (BENCH_ARGS=--quick: a check)
bench: $(STAMP)
	$(PY) -m simulations.benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
