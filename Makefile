# outbox kit: developer entry points. `make test` is the one command that runs the tests:
# it makes the virtualenv, starts the local PostgreSQL, Kafka and RabbitMQ (devstack/devstack,
# no Docker needed) and runs pytest against them.
SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-dev
DEVSTACK := devstack/devstack
PYTEST_ARGS ?=

# The first Python >= 3.11 on PATH (override: make PYTHON=/path/to/python3.12 venv).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	if command -v $$p >/dev/null 2>&1 && \
	   $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then \
	   command -v $$p; break; fi; done)

.PHONY: venv services test unit faults demo lint down clean bench bench-quick bench-db

## venv: .venv with the kit and its dev extra; re-installs only when pyproject.toml changes
venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: need python3 >= 3.11 on PATH" >&2; exit 1; }
	@test -x $(PY) || { echo "venv: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "venv: pip install -e '.[dev]'"
	@$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

## services: local PostgreSQL, Kafka and RabbitMQ (addresses: devstack/devstack env), idempotent
services:
	@$(DEVSTACK) up

## test: the whole test suite (tests/unit and tests/integration) against the devstack services
test: venv services
	@eval "$$($(DEVSTACK) env)"; \
	export OUTBOX_TEST_DATABASE_URL="$${OUTBOX_TEST_DATABASE_URL:-$$OUTBOX_DATABASE_URL}"; \
	export OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS="$${OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS:-$$OUTBOX_KAFKA_BOOTSTRAP_SERVERS}"; \
	export OUTBOX_TEST_RABBITMQ_URL="$${OUTBOX_TEST_RABBITMQ_URL:-$$OUTBOX_RABBITMQ_URL}"; \
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

## unit: the unit tests alone (tests/unit): no service needed, a few seconds
unit: venv
	@$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

## faults: the long fault-injection run (OUTBOX_FAULTS_SECONDS, default here 600; OUTBOX_FAULTS_SEED)
faults: venv services
	@eval "$$($(DEVSTACK) env)"; \
	export OUTBOX_TEST_DATABASE_URL="$${OUTBOX_TEST_DATABASE_URL:-$$OUTBOX_DATABASE_URL}"; \
	export OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS="$${OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS:-$$OUTBOX_KAFKA_BOOTSTRAP_SERVERS}"; \
	OUTBOX_FAULTS_SECONDS="$${OUTBOX_FAULTS_SECONDS:-600}" $(VENV)/bin/pytest -q -m faults $(PYTEST_ARGS)

## demo: the payments example against the devstack services (TRANSPORT=rabbitmq: over RabbitMQ)
TRANSPORT ?= kafka
demo: venv services
	@eval "$$($(DEVSTACK) env)"; $(PY) -m examples.payments.demo --transport $(TRANSPORT)

# --- benchmarks (bench/README.md) -------------------------------------------------
# The benchmark truncates the kit's tables, so it runs against a database of its
# own on the devstack server (created here once, as the devstack creates `outbox`).
BENCH_DB ?= outbox_bench
# Default: the devstack's own URL (devstack/devstack env) with the database swapped.
BENCH_DATABASE_URL ?= $${OUTBOX_DATABASE_URL%/*}/$(BENCH_DB)
BENCH_ARGS ?=

## bench: every measurement (about an hour on 2 cores); table + bench/results/{full,latest}.{json,md}
bench: venv services bench-db
	@eval "$$($(DEVSTACK) env)"; $(PY) -m bench --database-url "$(BENCH_DATABASE_URL)" $(BENCH_ARGS)

## bench-quick: the smoke run (under 3 minutes); bench/results/{quick,latest}.{json,md}
bench-quick: venv services bench-db
	@eval "$$($(DEVSTACK) env)"; $(PY) -m bench --quick --database-url "$(BENCH_DATABASE_URL)" $(BENCH_ARGS)

## bench-db: the benchmark's own database on the devstack PostgreSQL (idempotent)
bench-db: services
	@eval "$$($(DEVSTACK) env)"; port=$${OUTBOX_DATABASE_URL##*:}; port=$${port%%/*}; \
	sock=$(CURDIR)/.devstack/pg/run; \
	[ -S "$$sock/.s.PGSQL.$$port" ] || sock=$$(dirname $$(ls /tmp/outbox-devstack-*/.s.PGSQL.$$port | head -1)); \
	if [ "$$(id -u)" = 0 ]; then as="runuser -u postgres --"; else as=""; fi; \
	cd / && $$as psql -X -q -h "$$sock" -p $$port -d postgres -tAc \
	  "SELECT 1 FROM pg_database WHERE datname = '$(BENCH_DB)'" | grep -q 1 || \
	$$as psql -X -q -h "$$sock" -p $$port -d postgres -c "CREATE DATABASE $(BENCH_DB) OWNER outbox"; \
	$$as psql -X -q -h "$$sock" -p $$port -d $(BENCH_DB) -c "CREATE EXTENSION IF NOT EXISTS pg_walinspect" \
	  -c "GRANT EXECUTE ON FUNCTION pg_get_wal_stats(pg_lsn, pg_lsn, boolean) TO outbox"

## lint: ruff and mypy --strict on the library
lint: venv
	$(VENV)/bin/ruff check outbox relay harness tests bench examples
	$(VENV)/bin/mypy --strict outbox relay harness

## down: stop every devstack service (state is kept)
down:
	@$(DEVSTACK) down

## clean: stop the services and remove all local state: .devstack, .venv, caches
clean:
	-@$(DEVSTACK) purge
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info .stamp*
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
