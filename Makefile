VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-gpu test demo lint clean

setup:
	bash scripts/setup.sh

# GPU node: CUDA vLLM, flash-attn, bitsandbytes, deepspeed (needs CUDA; not runnable on the CPU machines).
setup-gpu:
	bash scripts/setup-gpu.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/grace demo

clean:
	rm -rf $(VENV) .pytest_cache
