# Two commands, on a fresh machine:
#   make lab    installs everything and opens JupyterLab on notebooks/
#   make test   installs everything and runs the whole test suite (pytest + nbval)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch: small, runs everywhere. On a CUDA machine use e.g.
#   make lab TORCH_SPEC="torch"   (pip then picks the CUDA build for your platform)
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Quick mode keeps each notebook to about a minute on 2 cores; COURSE_QUICK=0 runs the full version.
COURSE_QUICK ?= 1

.PHONY: install lab test lint bench engines budget clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" >/dev/null
	touch $@

install: $(VENV)/.installed

lab: install
	$(BIN)/jupyter lab notebooks/

# -p scripts.notebook_budget: each notebook nbval runs also gets a memory-budget item (Binder's 2 GB per user)
test: install
	$(BIN)/ruff check .
	COURSE_QUICK=$(COURSE_QUICK) $(BIN)/python -m pytest tests notebooks --nbval-lax --durations=15 -p scripts.notebook_budget

# --overwrite: a re-run refreshes its own reports/ files (bench refuses existing outputs otherwise)
bench: install
	$(BIN)/python -m course_lib bench --quick --json reports/bench.json --report reports/ --overwrite

# llama.cpp for `bench --suite engines`: llama-cpp-python builds llama.cpp from source (~15 min on 2 cores).
# GGML_NATIVE=ON compiles for this CPU's instruction set; pip's cache keeps the built wheel for the next venv.
engines: install
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -e ".[engines]"

# Peak memory and wall time of every notebook, each in its own kernel: reports/notebook_budget.{json,md}
budget: install
	$(BIN)/python scripts/notebook_budget.py

clean-venv:
	rm -rf $(VENV)
