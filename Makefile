# The two commands of the README. Each installs what it needs first.
.PHONY: setup run lint test
RUN_CONFIG ?=
NUM_CLIENTS ?= 10

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/fedlt-run --num-clients $(NUM_CLIENTS) --run-config "$(RUN_CONFIG)"

lint: setup
	.venv/bin/ruff check .

test: lint
	.venv/bin/python -m pytest -q
