#!/usr/bin/env bash
# GPU node set-up (CUDA 12.x, Python 3.11/3.12): CUDA vLLM, flash-attn,
# bitsandbytes 4-bit, DeepSpeed. Chosen at run time when torch sees CUDA.
# Not runnable on the CPU development machines (flash-attn needs nvcc + a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" --upgrade pip wheel
"${PIP[@]}" "vllm>=0.11"                       # brings its matching CUDA torch
"${PIP[@]}" -e ".[gpu,dev]"
"${PIP[@]}" flash-attn --no-build-isolation    # compiles against the installed torch
"$VENV/bin/python" -c "import torch, vllm, bitsandbytes, deepspeed; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu setup ok', torch.__version__, vllm.__version__)"
