# The README's commands. `make run` and `make test` each do all the set-up a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test soak bench audit install keycloak-start keycloak-stop clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'

run: install
	PYTHON=$(PY) scripts/run-local.sh

test: install
	$(PY) -m bandit --quiet --recursive app
	scripts/keycloak.sh fetch
	$(PY) -m pytest
	cd clients/typescript && npm ci --no-audit --no-fund && npm test

# A bounded soak (loopback only) of the broker started as `make run` starts it: prints 5xx, unexpected
# invalid_grant, lost answers and RSS growth; exits 1 on any. SOAK_MINUTES / SOAK_RATE change its length and load.
SOAK_MINUTES ?= 3
SOAK_RATE ?= 30
soak: install
	scripts/keycloak.sh fetch
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE)

# The broker against direct Keycloak in alternating windows, every goal of docs/benchmarks.md a ratio from one run
# (bench/run.py): prints each goal with pass/fail, writes bench/results/<date>.json and .png, updates the doc.
# PEER=oauth2-proxy also builds oauth2-proxy from source with Go and measures /verify against it (P9).
PEER ?=
bench: install
	scripts/keycloak.sh fetch
	command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	$(PY) bench/run.py $(if $(PEER),--peer $(PEER))

# Known vulnerabilities in the installed packages (pip-audit). Needs the vulnerability service on the network;
# where it cannot be reached, scripts/audit.sh says so plainly and exits 2 instead of reporting "no findings".
audit: install
	PYTHON=$(PY) scripts/audit.sh

keycloak-start:
	scripts/keycloak.sh start

keycloak-stop:
	scripts/keycloak.sh stop

clean:
	scripts/keycloak.sh stop
	rm -rf .run $(VENV)
