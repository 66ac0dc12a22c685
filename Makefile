# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv, installs everything, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

NATIVE_SRC := $(wildcard src/medhe/he/ckks/csrc/*/*.cpp src/medhe/he/ckks/csrc/*/*.h)

$(STAMP): pyproject.toml setup.py $(NATIVE_SRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools<81" wheel
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medhe demo

test: $(STAMP)
	MEDHE_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	MEDHE_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
	find src -name '*.so' -delete
