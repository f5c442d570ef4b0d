# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test lint system-deps dev-secrets

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

system-deps:
	bash scripts/install_system_deps.sh

demo: $(INSTALLED)
	$(VENV)/bin/ekd demo

test: $(INSTALLED) system-deps lint
	$(PY) -m pytest

# ruff's rules and formatter, and the import contracts of pyproject.toml (no cycles, services never import
# the trainer, Ray only in its adapters).
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# A development CA, server certificate and bearer token in ./secrets, for the docker-compose stack.
dev-secrets:
	bash scripts/make_dev_secrets.sh secrets
