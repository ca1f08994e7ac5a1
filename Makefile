# relayd: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
CERTS  := certs/dev

.PHONY: run test lint types pytest coverage bench certs clean web

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

$(CERTS)/server.crt: $(STAMP)
	$(VENV)/bin/relayd certs init $(CERTS)

certs: $(CERTS)/server.crt

# The web terminal: npm ci from web/package-lock.json (skipped while the lock is
# unchanged), then the page and the vendored xterm.js into relayd/web/assets/.
web:
	command -v npm >/dev/null || scripts/ensure-system-packages.sh nodejs npm
	web/build.sh

run: $(STAMP) $(CERTS)/server.crt web
	$(VENV)/bin/relayd demo --certs $(CERTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check relayd tests $(wildcard bench)
	$(VENV)/bin/ruff format --check relayd tests $(wildcard bench)

types: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) web
	scripts/ensure-system-packages.sh haproxy systemd chromium
	$(VENV)/bin/pytest -q -p no:cacheprovider

test: lint types pytest

coverage: $(STAMP)
	$(VENV)/bin/pip install -q coverage
	$(VENV)/bin/coverage run -m pytest -q && $(VENV)/bin/coverage report

bench: $(STAMP)
	scripts/ensure-system-packages.sh haproxy
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(CERTS) .relayd-demo build *.egg-info relayd/web/assets web/node_modules tests/artifacts
