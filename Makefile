# One-command entry points (see README.md). `make run` = set up + the default pipeline;
# `make test` = set up + the test suite (what CI runs).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test lint benchmark benchmark-search

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# CPU install: constraints-cpu.txt pins the CPU build of torch (no multi-GB CUDA download).
$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints-cpu.txt
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline.plan
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc metrics show

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check pipeline tests

# Speed figures side by side (selection vs the paper's procedure, MFU, generation, memory); ~40 min on 2 CPU cores.
benchmark: install
	$(BIN)/python -m pipeline.benchmark

# The ablation-parameter search against heretic-llm 1.4.0 (own venv, run as a program), three seeds;
# about 70 min on 2 CPU cores with AMX (README, "Head to head with heretic").
benchmark-search: install
	$(BIN)/python -m pipeline.benchmark search 'search.sources=[layer,per_layer]' --trials 20 --startup-trials 6 --seeds 0 1 2
