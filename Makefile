# Two commands set up everything on a fresh machine:
#   make demo   creates .venv, installs deathstar, maps estimate_pi on the embedded cluster
#   make test   mypy --strict, then the whole suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo typecheck test bench clean bytecode

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The package's modules compiled once, as an installed wheel has them: where the
# environment sets PYTHONDONTWRITEBYTECODE, every worker, daemon and CLI process would
# otherwise compile them again as it starts (about 0.1 s each here). Only what changed is
# compiled again; a stale file is ignored by Python, never used.
bytecode: $(STAMP)
	$(PY) -m compileall -q src scripts examples

demo: $(STAMP) bytecode
	mkdir -p out
	$(VENV)/bin/deathstar map examples.pi:estimate_pi --args examples/seeds.jsonl \
		--kwargs '{"draws": 100000}' --out out/pi.jsonl --report out/report.json
	$(PY) -m examples.pi out/pi.jsonl

typecheck: $(STAMP)
	$(PY) -m mypy

test: typecheck bytecode
	$(PY) -m pytest -q -ra

bench: $(STAMP) bytecode
	mkdir -p out
	$(PY) scripts/bench.py --json out/bench.json

clean:
	rm -rf $(VENV) out
