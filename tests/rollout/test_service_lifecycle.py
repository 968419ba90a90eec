"""`grace serve rollout` as a process: 503 while starting, exit code 1 when vLLM cannot run; CLI wiring."""

import os
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from shared.cli import app
from shared.local_redis import free_port


def test_commands_are_registered():
    runner = CliRunner()
    assert runner.invoke(app, ["serve", "rollout", "--help"]).exit_code == 0
    assert "--presets" in runner.invoke(app, ["bench", "rollout", "--help"]).output
    assert "--offline" in runner.invoke(app, ["rollout-iteration", "--help"]).output


def test_health_is_503_while_starting_and_the_service_exits_when_vllm_dies(tmp_path, tiny_models):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env |= {
        "GRACE_ROLLOUT_POLICY_MODEL": str(tiny_models.policy),
        "GRACE_ROLLOUT_VLLM_EXTRA_ARGS": '["--no-such-vllm-flag"]',  # vLLM exits at argument parsing
        "GRACE_ROLLOUT_REPLICA": "doomed",
    }
    command = [sys.executable, "-m", "shared.cli", "serve", "rollout", "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            statuses = set()
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    statuses.add(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code)
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            rc = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert statuses == {503}, output[-2000:]  # the gateway answered, never healthy
    assert rc == 1, output[-2000:]
    assert "event=rollout_startup_failed" in output or "event=vllm_died" in output
