# The two commands of the README: `make demo` and `make test`. Both bootstrap .venv on first use.
# The interpreter for .venv: the distribution's CPython when it is 3.11+ and can create venvs
# (Debian/Ubuntu/Fedora build it with PGO and LTO: the relay runs ~10% faster than on a default
# pyenv build, see bench/README.md), otherwise python3 from PATH. Override: make PYTHON=...
PYTHON ?= $(firstword $(foreach p,/usr/bin/python3 python3,$(shell $(p) -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo $(p))) python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-clients lint typecheck unit e2e clean print-python

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dbward demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

e2e: $(STAMP) test-clients
	$(VENV)/bin/pytest -q tests/e2e

# psql, pgbench, PostgreSQL, a JDK with pgjdbc, Node.js: installed when missing (root + apt).
test-clients:
	@bash tests/clients/install-missing.sh

test: test-clients lint typecheck
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

print-python:
	@echo $(PYTHON)
