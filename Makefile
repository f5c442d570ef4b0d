# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install exactly the locked dependency set (requirements.lock,
# with hashes) on a fresh machine; `make lock` refreshes the lock on purpose.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The installer and the lock tool are pinned too: their releases change how a lock is read and written.
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.7.0
LOCK := requirements.lock

.PHONY: demo test test-fast lint lock system-deps dev-secrets

$(INSTALLED): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(INSTALLED)

# Resolves pyproject.toml's dependencies (the dev extra included) once, pinned with hashes, into $(LOCK).
lock:
	python3 -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	$(VENV)-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --extra dev --strip-extras \
		--no-emit-index-url --no-emit-find-links --upgrade -o $(LOCK) pyproject.toml

system-deps:
	bash scripts/install_system_deps.sh

demo: $(INSTALLED)
	$(VENV)/bin/ekd demo

# Everything, as CI runs it, on two workers (a module's tests sharing one Ray instance share one: tests/conftest.py).
PYTEST_WORKERS := -n 2 --dist loadgroup

test: $(INSTALLED) system-deps lint
	$(PY) -m pytest $(PYTEST_WORKERS)

# The inner loop: lint and the tests that start no Ray, server process, Redis or training run.
test-fast: $(INSTALLED) lint
	$(PY) -m pytest $(PYTEST_WORKERS) -m "not integration and not slow and not faults"

# ruff's rules and formatter, the import contracts of pyproject.toml (no cycles, services never import the
# trainer, Ray only in its adapters), the type checker (mypy on services/ and trainer/), and the lock
# agreeing with pyproject.toml.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(PY) scripts/check_lock.py pyproject.toml $(LOCK)

# A development CA, server certificate and bearer token in ./secrets, for the docker-compose stack.
dev-secrets:
	bash scripts/make_dev_secrets.sh secrets
