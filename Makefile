# The two commands a fresh machine needs: `make demo` and `make test`.
# Each installs what it needs first (scripts/setup.sh).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench setup proto

demo:
	@scripts/setup.sh
	@scripts/demo.sh

test:
	@scripts/setup.sh --test
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/ruff format --check tvix_mountd tests benchmarks scripts
	$(BIN)/ruff check tvix_mountd tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/pytest -n 2 --dist loadgroup -q

bench:
	@scripts/setup.sh --bench
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.dispatch_floor
	$(BIN)/python -m benchmarks.bigwalk
	$(BIN)/python -m benchmarks.service
	$(BIN)/python -m benchmarks.handover
	$(BIN)/python -m benchmarks.grpcwalk
	$(BIN)/python -m benchmarks.nixcache
	$(BIN)/python -m benchmarks.nixcache --closure
	$(BIN)/python -m benchmarks.importing

setup:
	@scripts/setup.sh --test

proto:
	$(BIN)/python scripts/gen_proto.py
