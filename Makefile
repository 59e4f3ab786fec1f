# Two commands do all the set-up on a fresh machine:
#   make run    generate/pull the default data and run the retraining flow end to end
#   make test   run the test suite
# Both create .venv from requirements.lock first (installs never re-resolve).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: setup system-deps run test lint clean

setup: $(VENV)/.installed

# --compile-bytecode: each stage is a process importing TensorFlow; where PYTHONDONTWRITEBYTECODE
# is set (CI) Python would otherwise compile its sources anew in every one (4 s, not 11 s).
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip sync --python $(BIN)/python --quiet --compile-bytecode requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -e .
	touch $@

# ESMM_SETTINGS=none: the embedded defaults even where `esmm stack up` left a settings file.
run: setup
	ESMM_SETTINGS=none esmm data pull
	ESMM_SETTINGS=none esmm retrain

# The team-stack tests (tests/stack) run Debian's PostgreSQL 15 and check ports with `ss`:
# installed here when missing (as root, as CI runs).
system-deps:
	@if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || ! command -v ss >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends postgresql-15 iproute2 >/dev/null; fi

# Three pytest-xdist workers (more than the 2 cores CI has: the team-stack, flow and nightly
# files spend much of their time waiting on servers, heartbeats and subprocesses), a test file
# per work unit (its fixtures are built once), the long files first (tests/conftest.py).
# PYTEST_ARGS="-n 0" runs serially.
PYTEST_ARGS ?=
test: setup system-deps
	$(BIN)/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf artifacts mlflow.db mlruns .pytest_cache
