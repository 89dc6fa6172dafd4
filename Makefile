# Two commands a fresh clone needs: `make run` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: run test bench evidence install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when the package metadata or the pins change.
$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The main job: every strategy on digits, side by side; writes runs/<date-time>-compare/
# with summary.md, plots and report.html.
run: install
	$(PY) -m unison compare

# The architecture contracts (pyproject.toml [tool.importlinter]), then the tests.
test: install-dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

# Measures and prints tables (bench/RESULTS.md says what they showed); asserts nothing.
bench: install
	$(PY) bench/time_to_accuracy.py
	$(PY) bench/overhead.py
	$(PY) bench/overlap.py
	$(PY) bench/scaling.py
	$(PY) bench/memory.py
	$(PY) bench/startup.py
	$(PY) bench/stacked.py

# Every published finding of `unison reproduce --list`, 5 seeds each; rewrites docs/evidence.md
# (EVIDENCE_FLAGS=--quick for the 3-seed versions).
evidence: install
	$(PY) -m unison reproduce all --out docs/evidence --doc docs/evidence.md --overwrite $(EVIDENCE_FLAGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .import_linter_cache
