# The two commands of the README. Both set up ./.venv first (scripts/setup.sh, idempotent).
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	for b in benches/*.py; do .venv/bin/python $$b || exit 1; done
