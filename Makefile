# Switchboard: `make run` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: run test lint format bench services clean-db help

help:
	@echo "make run    - create .venv, migrate, load demo data, serve http://$(HOST):$(PORT)"
	@echo "make test   - lint, then the whole test suite (SQLite, PostgreSQL, Redis, Chromium)"
	@echo "make bench  - benchmarks under bench/ (prints ratios measured side by side)"
	@echo "make lint   - ruff check and ruff format --check"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/flask --app wsgi db upgrade
# Quiet: `flask serve` prints the demo login once, next to the address.
	$(BIN)/flask --app wsgi demo load >/dev/null
	SESSION_COOKIE_SECURE=$${SESSION_COOKIE_SECURE:-0} DEVICES_AUTO_PROVISION=$${DEVICES_AUTO_PROVISION:-1} \
		DEVICES_SIMULATOR_RECEIVERS=$${DEVICES_SIMULATOR_RECEIVERS:-4} DEVICES_SHURE_METER_RATE_MS=$${DEVICES_SHURE_METER_RATE_MS:-200} \
		$(BIN)/flask --app wsgi serve --host $(HOST) --port $(PORT)

services:
	@scripts/ensure-services

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest processes, a test file each at a time: most of the suite waits on sockets, worker
# processes and timers rather than the CPU, so two run in about half the time on two cores.
TEST_WORKERS ?= 2
test: $(STAMP) services lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP) services
	$(BIN)/python -m bench.run $(BENCH_ARGS)
