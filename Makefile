# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create the virtual environment in $(VENV) and install wsss into it when missing or stale.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.wsss-installed

.PHONY: demo test test-slow bench-synth clean

demo: $(STAMP)
	$(BIN)/wsss run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench-synth: $(STAMP)
	$(BIN)/python benchmarks/synth_difficulty.py --out runs/bench_synth

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf runs .pytest_cache
