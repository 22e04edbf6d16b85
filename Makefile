# make demo  — set up .venv, then run the whole pipeline on the embedded default data (CPU is fine)
# make test  — set up .venv with the dev tools, then run every test and execute every notebook (offline)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Where no torch is installed yet, take this one (here: the CPU wheel; override e.g. TORCH_SPEC="torch==2.5.1").
TORCH_SPEC ?= torch==2.13.0
# `make test` runs the tests on one pytest-xdist worker per core, at most 4 (TEST_WORKERS=0: one process)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test venv venv-dev clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || $(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

demo: venv
	$(PY) -m billiard_lora.demo

# Notebooks run in smoke mode (tiny model, few steps) under nbval, in order in one process after the tests (04 and
# 05 read what 03 trained); cells with assertions check their results.
test: venv-dev
	BILLIARD_LORA_SMOKE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests
	BILLIARD_LORA_SMOKE=1 $(PY) -m pytest -q -p no:xdist --nbval-lax notebooks

clean:
	rm -rf $(VENV) outputs .pytest_cache
