# `make demo` and `make test` each install what they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0
# Idle OpenMP threads sleep instead of spinning: small models on 2 shared cores ran ~50x slower.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test install lint zoo bench clean

install: $(STAMP)

# torch first, pinned to the local CPU wheel when no torch is present; else pip pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[eval,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mergekit-wp demo

test: $(STAMP)
	$(PY) -m pytest -q tests

LINT_PATHS := mergekit_wp tests benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) out
