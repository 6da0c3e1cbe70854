# The README's commands. `make run` and `make test` each do all the set-up a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test install keycloak-start keycloak-stop clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'

run: install
	PYTHON=$(PY) scripts/run-local.sh

test: install
	scripts/keycloak.sh fetch
	$(PY) -m pytest
	cd clients/typescript && npm ci --no-audit --no-fund && npm test

keycloak-start:
	scripts/keycloak.sh start

keycloak-stop:
	scripts/keycloak.sh stop

clean:
	scripts/keycloak.sh stop
	rm -rf .run $(VENV)
