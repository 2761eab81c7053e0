# `make demo` and `make test` create .venv on first use and install the pinned dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed
# fbgemm ships a CPU-only wheel under its own name; use the CUDA one where a GPU is present.
FBGEMM := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; \
                  then echo fbgemm-gpu==1.8.0; else echo fbgemm-gpu-cpu==1.8.0; fi)
DEMO_DIR ?= demo-output

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) $(FBGEMM)
	$(PIP) --no-deps torchrec==1.8.0
	$(PIP) -r requirements.lock
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ctr demo --out $(DEMO_DIR) --overwrite

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .bench-cache
