#!/usr/bin/env bash
# Wheels that scripts/gpu-check.sh needs and the lent GPU machine's image lacks (no network there), into
# .whl/ (git-ignored): about 47 MB, under the device tool's 64 MiB. Python 3.12 / manylinux x86_64 builds.
# Run here, with network to the package registry; then carry .whl (see README "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
  bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  typing-inspection==0.4.5 annotated-types==0.8.0 hjson==3.1.0
# DeepSpeed is published as a source archive only: build its pure-Python wheel (ops compile at first use)
[ -f .whl/deepspeed-0.19.8-py3-none-any.whl ] || DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps \
  --no-build-isolation deepspeed==0.19.8 -w .whl
du -sh .whl
