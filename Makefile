# gasnap: the two commands of the README are `make demo` and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/gasnap demo

test: setup lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check agent tests
	$(VENV)/bin/mypy

# The benchmark harness (side by side with virsh and qemu-img) is issue 7.
bench: setup
	@echo "make bench: no benchmarks yet (issue 7)" >&2; exit 2
