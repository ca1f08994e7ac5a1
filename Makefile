# relayd: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
CERTS  := certs/dev

.PHONY: run run-vm test test-guest guest-image lint types pytest coverage bench certs clean web

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

# Real-guest image in tests/guest/out/ (git-ignored). The script installs qemu-system-x86,
# busybox-static, cpio, linux-image-amd64 and openssl when missing, and rebuilds only
# when the kernel, busybox or the script changed (otherwise it returns at once).
guest-image:
	tests/guest/build-guest.sh

run-vm: $(STAMP) $(CERTS)/server.crt guest-image web
	$(PY) scripts/run-vm.py --certs $(CERTS)

test-guest: $(STAMP) guest-image
	RELAYD_GUEST_REQUIRED=1 $(VENV)/bin/pytest -q -p no:cacheprovider -m guest tests/guest

lint: $(STAMP)
	$(VENV)/bin/ruff check relayd tests scripts $(wildcard bench)
	$(VENV)/bin/ruff format --check relayd tests scripts $(wildcard bench)

types: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) web guest-image
	scripts/ensure-system-packages.sh haproxy systemd chromium
	RELAYD_GUEST_REQUIRED=1 $(VENV)/bin/pytest -q -p no:cacheprovider

test: lint types pytest

coverage: $(STAMP) web guest-image
	$(VENV)/bin/pip install -q coverage
	$(VENV)/bin/coverage run -m pytest -q && $(VENV)/bin/coverage report

bench: $(STAMP)
	scripts/ensure-system-packages.sh haproxy
	$(PY) bench/run.py
	$(PY) -m bench.pacing

clean:
	rm -rf $(VENV) $(CERTS) .relayd-demo build *.egg-info relayd/web/assets web/node_modules tests/artifacts tests/guest/out
