#!/usr/bin/env bash
# The GPU check (issue #14.7): one command on a lent CUDA machine with no network, under 8 minutes on one H200.
# QLoRA nf4 step, DeepSpeed ZeRO-2 step, reward scoring in CUDA bf16 against CPU fp32; the report is the last
# line (JSON) and $OUT/gpu-check.json when OUT is set. Wheels the image lacks come from .whl/ (scripts/gpu-wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 480 python3 scripts/gpu_check.py ${OUT:+--out "$OUT"} "$@"
