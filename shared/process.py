"""Child processes with a health check: used by the local stack and the tests.

A ``ServiceProcess`` runs a command in its own process group (so a shutdown
reaches its children too, e.g. vLLM's engine core), logs to a file, and
waits until an HTTP health URL answers 200.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class ServiceProcess:
    def __init__(
        self,
        name: str,
        command: list[str],
        log_path: str | Path,
        *,
        health_url: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ):
        self.name = name
        self.command = command
        self.log_path = Path(log_path)
        self.health_url = health_url
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True
        )
        log.info("event=process_started name=%s pid=%s log=%s", self.name, self.process.pid, self.log_path)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Blocks until ``health_url`` answers 200; raises with the log tail if the process dies or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.health_url is None:
                return
            try:
                if httpx.get(self.health_url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy at {self.health_url} after {timeout}s:\n{self.log_tail()}")
            time.sleep(interval)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        self._signal(signal.SIGKILL)  # stragglers left in the group
        self._log.close()
        log.info("event=process_stopped name=%s rc=%s", self.name, self.process.returncode)

    def kill(self) -> None:
        """SIGKILL the whole group at once (crash tests)."""
        if self.process is not None:
            self._signal(signal.SIGKILL)
            self.process.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "ServiceProcess":
        self.start()
        self.wait_healthy()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
