# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv, installs everything, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install orthanc wheel docs clean

NATIVE_SRC := $(wildcard src/medhe/he/ckks/csrc/*/*.cpp src/medhe/he/ckks/csrc/*/*.h)

$(STAMP): pyproject.toml setup.py $(NATIVE_SRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools<81" wheel
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP) orthanc

# Orthanc + its DICOMweb plugin (Debian packages): the real PACS tests/test_pacs.py runs medhe pacs against. Installed
# when missing and possible (root with apt-get); otherwise a note, and tests/test_pacs.py fails saying what to install.
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
orthanc:
	@if [ -x /usr/sbin/Orthanc ] && [ -e $(ORTHANC_DICOMWEB) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb >/dev/null || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb >/dev/null; } || \
	  echo "note: apt-get could not install orthanc orthanc-dicomweb; tests/test_pacs.py needs them"; \
	else echo "note: Orthanc is missing and cannot be installed here (needs root and apt-get: apt-get install orthanc orthanc-dicomweb); tests/test_pacs.py needs it"; fi

demo: $(STAMP)
	$(BIN)/medhe demo

# tests/suite.py: one pytest process per test file (small ones packed), three at a time on 2 cores (cores + 1, at most 3; --jobs N for more); see its docstring for why
test: $(STAMP) orthanc
	MEDHE_OFFLINE=1 $(BIN)/python tests/suite.py

test-fast: $(STAMP)
	MEDHE_OFFLINE=1 $(BIN)/python tests/suite.py -m "not slow"

# dist/medhe-*.whl with the compiled runtime, the shipped models and the page's files. After `make install` it reuses
# the modules that install compiled (setup.py), so it takes seconds; without .venv it compiles (~2 min). Files left
# in build/lib by an earlier build would go into the wheel too, so all but the compiled modules are removed first.
WHEEL_PIP := $(if $(wildcard $(BIN)/pip),$(BIN)/pip,$(PYTHON) -m pip)
wheel:
	if [ -d build ]; then find build -path 'build/lib.*' -type f ! -name '*.so' -delete; fi
	$(WHEEL_PIP) wheel . --no-deps -w dist

# the API reference and guides into site/ (mkdocs.yml); --strict: any warning (a broken link, a bad docstring) fails
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
	find src -name '*.so' -delete
