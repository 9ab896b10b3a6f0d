# One venv in .venv; every target installs it first if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch: an unpinned torch pulls several GB of CUDA packages.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-slow bench lint format clean

install: $(VENV)/.install.stamp

$(VENV)/.install.stamp: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,ray,openvino,serve,serve-test]"
	touch $@

demo: install
	$(BIN)/segdeploy demo

test: install
	$(BIN)/python -m pytest

# Real-data tests on ../shared/data/camvid (skipped when it is absent).
test-slow: install
	$(BIN)/python -m pytest -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]  # 5: none collected

bench: install
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
