VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-gpu test test-unit demo lint clean

setup:
	bash scripts/setup.sh

# GPU node: CUDA vLLM, flash-attn, bitsandbytes, deepspeed (needs CUDA; not runnable on the CPU machines).
setup-gpu:
	bash scripts/setup-gpu.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the pure-logic tests alone (no Redis, vLLM or models): seconds
test-unit: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check services shared tests scripts
	$(VENV)/bin/ruff format --check services shared tests scripts

demo: setup
	$(VENV)/bin/grace demo

clean:
	rm -rf $(VENV) .pytest_cache
