# Everything a fresh machine needs: `make demo` and `make test` create .venv/ and install
# the pinned versions of constraints.txt before running.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test install install-test inspect clean

$(VENV)/.base: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: $(VENV)/.base
	$(PY) -m flamingo_jax.demo --workdir workdirs/demo $(DEMO_FLAGS)

test: $(VENV)/.test
	$(PY) -m pytest -q tests

inspect: $(VENV)/.base
	$(VENV)/bin/flamingo-inspect --config experiments/flamingo_9b.py

clean:
	rm -rf $(VENV) workdirs
