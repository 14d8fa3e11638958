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
	# pip compiles one file at a time, half of the install: compiled on every core instead (a few
	# files that some packages ship are not Python 3; they fail there as they would under pip).
	$(PY) -m pip install -q --no-compile -c constraints.txt -e ".[test]"
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m simulations.demo --run-dir $(RUN_DIR)

# pytest-xdist: one worker per module (module fixtures run once), the longest modules first
# (tests/conftest.py), so that real processes waiting on one another overlap with computing tests.
PYTEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# Every benchmark at the demo's and LiQA's size vs its baseline -> docs/benchmarks.md (BENCH_ARGS=--quick: a check)
bench: $(STAMP)
	$(PY) -m simulations.benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
