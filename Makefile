# Two commands a fresh clone needs: `make run` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: run test install install-dev clean

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

# The main job: the seed's XOR demo, then digits trained by per-epoch averaging on 4 workers.
run: install
	$(PY) -m unison demo xor
	$(PY) -m unison train examples/digits.toml --overwrite --out runs/digits

test: install-dev
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
