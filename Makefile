# MACE-Field Serve: the two quickstart commands (see README.md)
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: serve test install install-test

# torch==2.13.0 first: on CPU-only build machines this picks the local CPU wheel;
# anything looser pulls the newest CUDA build (several GB).  The tests install the cueq extra
# (cuEquivariance, pure Python; its fallback runs on CPU) so that the conversion tests run.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ./client
	$(PIP) install -q -e ./server

install-test:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ./client
	$(PIP) install -q -e "./server[test,cueq]"

serve: install
	macefield-serve

test: install-test
	$(PYTHON) -m pytest -q tests
