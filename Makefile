# make run: install pgtally in .venv, start PostgreSQL (embedded, or DATABASE_URL) and serve the API.
# make test: install the test dependencies too and run the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench schema clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/pgtally serve

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

schema: $(VENV)/.installed
	$(BIN)/pgtally db upgrade
	$(BIN)/pgtally db schema --write

bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pgtally
