# Two commands set up everything on a fresh machine:
#   make demo   creates .venv, installs deathstar, maps estimate_pi on the embedded cluster
#   make test   mypy --strict, then the whole suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo typecheck test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/deathstar map examples.pi:estimate_pi --args examples/seeds.jsonl \
		--kwargs '{"draws": 100000}' --out out/pi.jsonl --report out/report.json
	$(PY) -m examples.pi out/pi.jsonl

typecheck: $(STAMP)
	$(PY) -m mypy

test: typecheck
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	mkdir -p out
	$(PY) scripts/bench.py --json out/bench.json

clean:
	rm -rf $(VENV) out
