# gasnap: the two commands of the README are `make demo` and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=

PREFIX ?= /opt/gasnap
SYSCONFDIR ?= /etc/gasnap
UNITDIR ?= /etc/systemd/system

.PHONY: setup demo test lint bench install soak

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/gasnap demo

# setup plus what only the tests need (PostgreSQL, systemd-analyze, vagrant).
test:
	@bash scripts/setup.sh --test
	@$(MAKE) --no-print-directory lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# gasnap in its own venv under PREFIX, the systemd units, a default config.
install:
	@bash scripts/setup.sh --packages
	@PREFIX=$(PREFIX) SYSCONFDIR=$(SYSCONFDIR) UNITDIR=$(UNITDIR) bash scripts/install.sh

lint:
	$(VENV)/bin/ruff check agent tests
	$(VENV)/bin/mypy

# Everything at once, with faults, for SOAK_MINUTES (not part of `make test`);
# writes docs/soak.md and docs/soak.json.  See tests/soak.py.
SOAK_MINUTES ?= 20
export SOAK_MINUTES
soak:
	@bash scripts/setup.sh --test
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/soak.py \
		--timeout=$$(( $(SOAK_MINUTES) * 60 + 1800 )) $(PYTEST_ARGS)

# P1-P11 side by side with virsh and qemu-img; writes docs/benchmarks.md and
# docs/benchmarks.json.  `make bench QUICK=1`: fewer runs, prints only.
bench: setup
ifdef QUICK
	$(VENV)/bin/python -m gasnap.bench --quick
else
	$(VENV)/bin/python -m gasnap.bench --docs docs
endif
