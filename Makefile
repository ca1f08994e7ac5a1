# relayd: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
CERTS  := certs/dev
# The keystroke path, compiled in place with mypyc (relayd/native.py says which and why).
NATIVE     := build/native.stamp
NATIVE_SRC := $(shell $(PYTHON) -c 'import relayd.native as n; print(*(m.replace(".", "/") + ".py" for m in n.NATIVE_MODULES))')

.PHONY: native wheel run run-cluster run-vm test test-guest guest-image lint types pytest webtest coverage bench certs clean web

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	RELAYD_NATIVE=0 $(PIP) install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# Stale modules are removed first, so a failed build never leaves old code running. No C
# compiler: relayd runs interpreted (same behaviour, slower), and this says so. The build
# writes relayd/_native_manifest.json (source hashes): an import that finds a compiled
# module older than its source runs the whole keystroke path interpreted, and says so.
$(NATIVE): $(STAMP) setup.py relayd/native.py $(NATIVE_SRC)
	rm -f relayd/*.so relayd/ports/*.so relayd/_native_manifest.json
	if command -v cc >/dev/null; then $(PY) setup.py -q build_ext --inplace --force; \
	else echo "relayd: no C compiler; the keystroke path runs interpreted" >&2; fi
	mkdir -p build && touch $@

native: $(NATIVE)

# A deployable wheel with the compiled keystroke path, in dist/.
# Built from scratch: setuptools would also pack any module left in build/lib by an
# older build, and a stale compiled module shadows its source. The check after it
# refuses a wheel whose compiled modules are not exactly native.py's list, or whose
# manifest does not match the sources it carries.
wheel: $(STAMP)
	$(PIP) install -q 'setuptools>=68' wheel
	rm -rf build/lib.* build/temp.* build/bdist.* dist
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	$(PY) scripts/check-wheel.py dist/*.whl

$(CERTS)/server.crt: $(STAMP)
	$(VENV)/bin/relayd certs init $(CERTS)

certs: $(CERTS)/server.crt

# The web terminal: npm ci from web/package-lock.json (skipped while the lock is
# unchanged), then the page and the vendored xterm.js into relayd/web/assets/.
web:
	command -v npm >/dev/null || scripts/ensure-system-packages.sh nodejs npm
	web/build.sh

run: $(STAMP) $(NATIVE) $(CERTS)/server.crt web
	$(VENV)/bin/relayd demo --certs $(CERTS)

# `make run` as a region: Redis, three gateways (cluster mode) and HAProxy in front of the
# simulated VMs; the same lines plus one `gateway:` line each (scripts/run-cluster.py).
run-cluster: $(STAMP) $(NATIVE) $(CERTS)/server.crt web
	scripts/ensure-system-packages.sh haproxy redis-server
	$(PY) scripts/run-cluster.py --certs $(CERTS)

# Real-guest image in tests/guest/out/ (git-ignored). The script installs qemu-system-x86,
# busybox-static, cpio, linux-image-amd64 and openssl when missing, and rebuilds only
# when the kernel, busybox or the script changed (otherwise it returns at once).
guest-image:
	tests/guest/build-guest.sh

run-vm: $(STAMP) $(NATIVE) $(CERTS)/server.crt guest-image web
	$(PY) scripts/run-vm.py --certs $(CERTS)

test-guest: $(STAMP) $(NATIVE) guest-image
	RELAYD_GUEST_REQUIRED=1 $(VENV)/bin/pytest -q -p no:cacheprovider -m guest tests/guest

lint: $(STAMP)
	$(VENV)/bin/ruff check setup.py relayd tests scripts $(wildcard bench)
	$(VENV)/bin/ruff format --check setup.py relayd tests scripts $(wildcard bench)

types: $(STAMP)
	$(VENV)/bin/mypy

# Two pytest-xdist workers: most of the suite waits on real timeouts, leases and processes,
# so two finish it in well under two thirds of the time of one, even on two cores (about
# 5 minutes instead of 9 here). tests/conftest.py keeps the CPU-heavy real-process modules
# (the regions, the QEMU guests) to one worker each. PYTEST_WORKERS=0: one process, as before.
# The seeded chaos run (bench/chaos.py's load on a region, held to "no stalls") runs after
# the rest, on its own: nothing runs beside it, as before the workers. Its module's other
# test (the frozen owner) runs on the workers, with the other region modules.
PYTEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup
CHAOS_SEEDED := tests/cluster/test_chaos.py::test_console_offsets_and_log_hold_under_a_seeded_fault_schedule

pytest: $(STAMP) $(NATIVE) web guest-image
	scripts/ensure-system-packages.sh haproxy systemd chromium redis-server
	RELAYD_GUEST_REQUIRED=1 $(PYTEST) --deselect=$(CHAOS_SEEDED)
	$(VENV)/bin/pytest -q -p no:cacheprovider $(CHAOS_SEEDED)
	# The keystroke path again, interpreted: what runs where there is no C compiler.
	RELAYD_PURE_PYTHON=1 $(PYTEST) tests/test_native.py \
		tests/test_frames.py tests/test_ring.py tests/test_throttle.py tests/test_consolelog.py \
		tests/test_telnet.py tests/test_link_protocol.py tests/test_gateway.py tests/on_uvloop

# The page's modules that have no DOM (protocol.js, api.js, sysrq.js), in Node's own
# test runner: no npm packages, no browser (tests/test_web.py drives the page itself).
webtest:
	command -v node >/dev/null || scripts/ensure-system-packages.sh nodejs
	node --test web/tests/*.test.mjs

test: lint types webtest pytest

coverage: $(STAMP) web guest-image
	$(VENV)/bin/pip install -q coverage
	RELAYD_PURE_PYTHON=1 $(VENV)/bin/coverage run -m pytest -q && $(VENV)/bin/coverage report

bench: $(STAMP) $(NATIVE)
	scripts/ensure-system-packages.sh haproxy
	$(PY) bench/run.py
	$(PY) -m bench.pacing

clean:
	rm -rf $(VENV) $(CERTS) .relayd-demo .relayd-demo-cluster build dist *.egg-info relayd/*.so relayd/ports/*.so relayd/_native_manifest.json relayd/web/assets web/node_modules tests/artifacts tests/guest/out
