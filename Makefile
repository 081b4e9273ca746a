# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test test-fast lint venv clean-venv lock

# Python 3.11 or later (asyncio.timeout, datetime.UTC). A half-made environment (python3-venv missing: the folder exists, pip does not) is removed, so the
# next `make` starts afresh instead of skipping this step.
$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "This project needs Python 3.11 or later; $(PYTHON) is older. Install a newer one and run make again with PYTHON=python3.11 (or newer)." >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) && $(PY) -m pip install --quiet --upgrade pip || { rm -rf $(VENV); \
	  echo "Could not set up a Python virtual environment in $(VENV). On Debian or Ubuntu: sudo apt install python3-venv, then run make again." >&2; exit 1; }

$(RUNTIME_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(DEV_STAMP)

run: $(RUNTIME_STAMP)
	$(PY) -m bot

lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The inner loop: lint and the tests marked neither slow (end-to-end, Celery, load, benchmarks,
# torch.compile, anything over a few seconds) nor gpu; a few minutes on two cores.
test-fast: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# requirements.lock: what the Docker image installs, every package pinned with its hashes, resolved
# from requirements.txt for the image's platform (Linux x86_64, CPython 3.12: the Dockerfile's base)
# on any machine. Run it after editing requirements.txt (tests/test_dockerfile.py fails until then);
# pins that still fit are kept, `make lock LOCK_ARGS=--upgrade` moves every package to its newest.
# uv runs from an environment of its own, so the project's stays as requirements*.txt make it.
LOCK_VENV ?= .venv-lock
UV_VERSION := 0.13.10

$(LOCK_VENV)/bin/uv:
	$(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/python -m pip install --quiet uv==$(UV_VERSION)

lock: $(LOCK_VENV)/bin/uv
	$(LOCK_VENV)/bin/uv pip compile --quiet --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
	  --generate-hashes --custom-compile-command "make lock" $(LOCK_ARGS) --output-file requirements.lock requirements.txt
