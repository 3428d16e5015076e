# The two set-up commands of the README:  `make quickstart`  and  `make test`.
# Both create ./.venv on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject.toml; installing it first lets a CPU-only machine pick a CPU build
# (set TORCH_INDEX=https://download.pytorch.org/whl/cpu) instead of the multi-GB CUDA default.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install quickstart test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	touch $@

quickstart: install
	$(BIN)/sama quickstart

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/video_io.py

clean:
	rm -rf $(VENV) quickstart .pytest_cache
