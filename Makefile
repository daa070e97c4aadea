# make run: install pgtally in .venv, start PostgreSQL (embedded, or DATABASE_URL) and serve the API.
# make test: install the test dependencies (and Debian's chromium for the browser tests), run the whole suite.
# make lint: ruff over the project (its rules: [tool.ruff] in pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench schema clean

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

# Browser tests drive Debian's Chromium through Playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -qq chromium >/dev/null

test: $(VENV)/.installed-test $(CHROMIUM)
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

schema: $(VENV)/.installed
	$(BIN)/pgtally db upgrade
	$(BIN)/pgtally db schema --write

bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pgtally
