# One front door. `make test` works on a fresh clone: it creates the virtual environment if it is
# missing, installs hardmine with its dev tools (the tested torch pair from constraints.txt), runs
# the linter and the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup lint test compare bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q

# OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep rather than spin while they wait. On a machine that
# other jobs share, spinning threads steal each other's cores and a training step takes 10-20x
# longer (measured on 2 cores at load 6: 0.13 s -> 2-15 s per RetinaNet step).
compare: setup
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/hardmine compare --jobs auto

bench: setup
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
