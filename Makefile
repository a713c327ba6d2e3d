# The two commands of the README. Both set up ./.venv first (scripts/setup.sh, idempotent).
.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

# The whole suite (what CI runs): tests/unit, tests/integration and tests/e2e.
test: setup
	.venv/bin/python -m pytest -q

# tests/unit only: no Ray, no servers, no subprocess; under 2 minutes on 2 cores.
test-fast: setup
	.venv/bin/python -m pytest -q tests/unit

bench: setup
	for b in benches/*.py; do .venv/bin/python $$b || exit 1; done
