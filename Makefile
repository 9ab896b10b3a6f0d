# One venv in .venv; every target installs it first if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# Where torch comes from: auto (PyTorch's CPU wheel index unless nvidia-smi is found;
# from PyPI, Linux torch is the CUDA build, GBs of wheels), pypi, or an index URL.
# Falls back to pip's default index; scripts/install_torch.sh says which it installed.
TORCH_INDEX ?= auto

.PHONY: install demo test test-slow bench lint format docs docs-serve clean

install: $(VENV)/.install.stamp

$(VENV)/.install.stamp: pyproject.toml scripts/install_torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PIP=$(BIN)/pip PYTHON=$(BIN)/python TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" \
		scripts/install_torch.sh
	$(BIN)/pip install --quiet -e ".[dev,ray,openvino,docs,video,tiles,serve,serve-test]"
	touch $@

demo: install
	$(BIN)/segdeploy demo

test: install
	$(BIN)/python -X faulthandler -m pytest

# Real-data tests (CamVid; skipped when it is absent, see tests/conftest.py) and the
# slower end-to-end tests (every command of README.md and docs/getting-started).
test-slow: install
	$(BIN)/python -X faulthandler -m pytest -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]  # 5: none collected

bench: install
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The documentation site (mkdocs-material) into site/; --strict fails on any warning
# (a broken link, a nav entry to a missing page, an API name that no longer exists).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info site
