# Two commands for a new user on a fresh machine:
#   make demo   sets up .venv, pretrains on the bundled real data and compares strategies
#   make test   sets up .venv and runs the whole test suite (what CI runs)
#   make docs   builds the docs site into site/ (mkdocs --strict)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
# Users with a GPU may set TORCH="torch==<version>" (any torch >= 2.4 works).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint typecheck docs clean

$(STAMP): pyproject.toml ohlc/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the seed's OHLC system: a plugin in its own distribution, installed like a third party's
	$(BIN)/python -m pip install -q --no-deps -e ./ohlc
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/moola-engine demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check moola_engine ohlc plugins tests
	$(BIN)/mypy

# mypy --strict over moola_engine (the settings live in pyproject.toml [tool.mypy])
typecheck: $(STAMP)
	$(BIN)/mypy

# the docs site (mkdocs.yml): a broken link or anchor fails the build; the test suite runs the same build
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site .pytest_cache
