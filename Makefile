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
# Most tests wait (deployed timers, processes starting) rather than compute: they run TEST_WORKERS at a
# time (pytest-xdist; a module's tests sharing a set-up stay together by `xdist_group`). Then those
# marked `alone`, whose bounds on time, rates or memory need the machine to themselves, run one by one.
# Both passes run, so one report lists every failure. PYTEST_ARGS goes to both (e.g. --basetemp DIR).
# Bytecode is cached even where PYTHONDONTWRITEBYTECODE is set: otherwise each of the hundreds of gateway
# processes the tests start compiles the package anew, and each pass rewrites every test module's asserts.
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
test: install
	scripts/test-deps
	status=0; export PYTHONDONTWRITEBYTECODE=; \
	$(PY) -m pytest -m 'not alone' -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) || status=$$?; \
	$(PY) -m pytest -m alone $(PYTEST_ARGS) || status=$$?; \
	exit $$status

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
	scripts/test-deps --bench
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info
