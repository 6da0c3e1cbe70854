# The README's commands. `make run` and `make test` each do all the set-up a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test soak audit install keycloak-start keycloak-stop clean

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
