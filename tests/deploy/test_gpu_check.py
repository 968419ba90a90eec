"""scripts/gpu_check.py on this CPU machine: the CUDA-only checks say they were skipped and why, and the
reward comparison runs for real (CPU bf16 against CPU fp32), so the script a lent GPU runs is known to work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_reports_every_check(tiny_models, tmp_path):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "gpu-check.json").read_text()) == report
    checks = report["checks"]
    assert set(checks) == {"qlora_nf4", "deepspeed_zero2", "reward_bf16", "losses_0p5b", "long_context", "attention", "profile"}
    for name in ("qlora_nf4", "deepspeed_zero2", "losses_0p5b", "long_context", "attention", "profile"):
        assert checks[name]["status"] == "skipped" and "CUDA" in checks[name]["reason"]
    reward = checks["reward_bf16"]
    assert reward["status"] == "ok" and reward["device"] == "cpu bf16 vs cpu fp32"
    assert set(reward["worst_error"]) == set(reward["tolerance"]) and not reward["failed"]
    assert reward["worst_error"]["length"] == 0.0
    assert reward["worst_error"]["general_perplexity"] > 0  # bf16 really ran: it differs from fp32, within tolerance
