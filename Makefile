# Everything runs from a virtualenv in .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[fast,test,dev]'
	touch $(STAMP)

# The embedded default: a local OpenAI-compatible backend on BACKEND_PORT and the gateway on PORT.
PORT ?= 8000
BACKEND_PORT ?= 8001

run: install
	@$(PY) scripts/run-local $(PORT) $(BACKEND_PORT)

# The Debian packages the tests use are installed first (scripts/test-deps says how when it cannot).
test: install
	scripts/test-deps
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests/test_layers.py

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info
