# The two commands of the README: `make demo` and `make test`. Both install into .venv first
# when needed (torch 2.13.0 first: a looser spec would pull a multi-GB CUDA build), then the
# project with constraints.txt (the lock: reproducible, quick installs).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST  := $(PY) -m pytest

# Python keeps the compiled bytecode of the project's own modules (in __pycache__, ignored by
# git) even where the shell sets PYTHONDONTWRITEBYTECODE: the tests start ~260 `sandbox`
# processes, the served zones and Ray's workers, and each would otherwise compile the
# product's modules again from source (0.15-0.3 s of CPU each).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo demo-served test test-slow test-all check lint bench clean

# pip installs without compiling, then compileall writes the same bytecode on every core (pip
# writes ~22,000 files one at a time; a fresh install, interleaved: 124-131 -> 79-90 s); some ship
# files that are not Python 3 (test fixtures): -qq and `|| true` pass them quietly, as pip does
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[dev]'
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PY) -m compileall -q foundation sandbox privacy connectors training policies
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/sandbox demo

# the same mission across the trust boundary: `sandbox serve` as its own OS account, the
# steward and the researcher as other accounts through the CLI (needs root for the accounts)
demo-served: install
	$(VENV)/bin/sandbox demo --served

# the default run: fast tests plus integration tests on a real local Ray, in two pytest
# workers (whole files per worker: module fixtures are built once). On 2 cores, 1743 tests:
# 249-321 s in the last runs (this machine's speed drifts by ~15% within an hour),
# both cores busy for all but ~35-50 CPU-s (more workers do not help)
test: install
	$(PYTEST) -m "not slow" -q -n 2 --dist loadfile

# slower real-engine tests (CI runs them too, after `make test`)
test-slow: install
	$(PYTEST) -m "slow" -q

test-all: install
	$(PYTEST) -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

check: lint test-all

bench: install
	$(PY) benchmarks/bench_dpsgd.py
	$(PY) benchmarks/bench_parquet.py
	$(PY) benchmarks/bench_submit.py
	$(PY) benchmarks/bench_calibration.py
	$(PY) benchmarks/bench_rdp.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
