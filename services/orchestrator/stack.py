"""The local stack: Redis plus the four services as supervised child processes.

Every child gets one YAML settings file (``GRACE_CONFIG``) written into the
stack folder, so all of them agree on Redis, the models and the adapter
store; logs go to ``<stack dir>/logs/<service>.log``. A child that dies is
restarted (with backoff), and so is the embedded Redis, on the same folder
(append-only file, fsync every second) and port; Ctrl-C or ``down()`` stops
everything, process groups included, so no orphan stays behind.

A restarted rollout service keeps its replica name: its hot-swap manager
restores the newest adapter from the stream before it reports ready.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shared.local_redis import LocalRedis, free_port
from shared.process import ServiceProcess

log = logging.getLogger(__name__)

SERVICES = ("rollout", "reward", "trainer", "judge")
HEALTH_PATHS = {"rollout": "/health", "reward": "/ready", "judge": "/health"}  # the trainer has no HTTP port


@dataclass
class StackConfig:
    stack_dir: Path
    services: tuple[str, ...] = SERVICES
    redis_url: str | None = None
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    common: dict = field(default_factory=dict)  # settings every service shares (models, adapter_root, ...)
    per_service: dict[str, dict] = field(default_factory=dict)
    startup_timeout: float = 600.0
    rollout_replicas: int = 1  # rollout services (each with its own vLLM), named rollout, rollout-2, ...


@dataclass
class StackInfo:
    """What clients need to reach a running stack (written to ``stack.json``)."""

    redis_url: str
    urls: dict[str, str]
    config_path: str
    rollout_urls: list[str] = field(default_factory=list)  # every replica; urls["rollout"] is the first

    def gateway_urls(self) -> str:
        """The rollout worker's ``gateway_url``: every replica, comma-separated."""
        return ",".join(self.rollout_urls or [self.urls["rollout"]])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, path: Path) -> "StackInfo":
        if not path.exists():
            raise FileNotFoundError(f"no running stack described at {path}: start one with `grace stack up`")
        return cls(**json.loads(path.read_text()))


def _kind(name: str) -> str:
    """The service a process runs: ``rollout-2`` -> ``rollout``."""
    return name.split("-", 1)[0]


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.dir = Path(config.stack_dir).resolve()
        self.redis: LocalRedis | None = None
        self.processes: dict[str, ServiceProcess] = {}
        self.restarts: dict[str, int] = {}
        self.info: StackInfo | None = None
        self._lock = threading.Lock()  # a kill and a restart of the same child never interleave

    def up(self) -> StackInfo:
        self.dir.mkdir(parents=True, exist_ok=True)
        redis_url = self.config.redis_url
        if not redis_url:
            self.redis = LocalRedis(data_dir=self.dir / "redis").start()
            redis_url = self.redis.url
        names = [n for name in self.config.services for n in self._instances(name)]
        ports = {name: self.config.ports.get(name) or free_port() for name in names if _kind(name) in HEALTH_PATHS}
        urls = {name: f"http://{self.config.host}:{port}" for name, port in ports.items()}
        rollout_urls = [urls[name] for name in self._instances("rollout") if name in urls]
        settings = {"common": {**self.config.common, "redis_url": redis_url}}
        for name, values in self.config.per_service.items():
            settings[name] = dict(values)
        if "rollout" in urls:  # the judge defaults to the project's own rollout service
            settings.setdefault("judge", {}).setdefault("base_url", urls["rollout"] + "/v1")
            settings["judge"].setdefault("model", "policy")
        config_path = self.dir / "settings.yaml"
        config_path.write_text(yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
        try:
            for name in names:
                self._start(name, ports.get(name), urls.get(name), config_path)
            for name, process in self.processes.items():
                process.wait_healthy(timeout=self.config.startup_timeout)
                log.info("event=service_ready name=%s url=%s", name, urls.get(name, "-"))
        except BaseException:
            self.down()
            raise
        urls = {name: url for name, url in urls.items() if name == _kind(name)}  # one URL per service, the first replica
        self.info = StackInfo(redis_url=redis_url, urls=urls, config_path=str(config_path), rollout_urls=rollout_urls)
        self.info.save(self.dir / "stack.json")
        return self.info

    def _instances(self, name: str) -> list[str]:
        """Process names of a service: ``rollout``, ``rollout-2``, ... for rollout replicas, else the name."""
        count = self.config.rollout_replicas if name == "rollout" else 1
        return [name] + [f"{name}-{i}" for i in range(2, count + 1)]

    def _start(self, name: str, port: int | None, url: str | None, config_path: Path) -> None:
        kind = _kind(name)
        command = [sys.executable, "-m", "shared.cli", "serve", kind]
        if port is not None:
            command += ["--host", self.config.host, "--port", str(port)]
        env = {"GRACE_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}
        if kind == "rollout" and self.config.rollout_replicas > 1:  # one adapter consumer group per replica
            env["GRACE_ROLLOUT_REPLICA"] = f"{self.dir.name}-{name}"
        process = ServiceProcess(
            name,
            command,
            self.dir / "logs" / f"{name}.log",
            health_url=f"{url}{HEALTH_PATHS[kind]}" if url else None,
            env=env,
        )
        self.processes[name] = process.start()

    def supervise(self, interval: float = 2.0, max_restarts: int = 5, stop: threading.Event | None = None) -> None:
        """Restarts children (and the embedded Redis) that die, up to ``max_restarts`` each; returns on
        KeyboardInterrupt or once ``stop`` is set (so it can run in a thread beside a run)."""
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                self.restart_dead(max_restarts)
                stop.wait(interval)
        except KeyboardInterrupt:
            pass

    def restart_dead(self, max_restarts: int = 5) -> list[str]:
        """One supervision pass: what was dead and is started again (``redis`` for the embedded Redis)."""
        restarted = []
        with self._lock:
            if self.redis is not None and not self.redis.alive():
                self._count_restart("redis", self.dir / "redis" / "redis.log", max_restarts)
                self.redis.start()  # same folder and port: the AOF is replayed, clients reconnect to the same URL
                restarted.append("redis")
            for name, process in list(self.processes.items()):
                if process.alive():
                    continue
                count = self._count_restart(name, process.log_path, max_restarts, process.process.returncode)
                time.sleep(min(30, 2 ** (count - 1)))
                process.stop()
                process.start()
                restarted.append(name)
        return restarted

    def _count_restart(self, name: str, log_path: Path, max_restarts: int, rc: int | None = None) -> int:
        count = self.restarts.get(name, 0)
        if count >= max_restarts:
            raise RuntimeError(f"{name} died {count + 1} times; see {log_path}")
        log.warning("event=service_died name=%s rc=%s restart=%d", name, rc, count + 1)
        self.restarts[name] = count + 1
        return count + 1

    def kill(self, name: str) -> None:
        """SIGKILL a child's whole process group (vLLM included), or the embedded Redis (``redis``), as a
        crash would; the supervisor restarts it. For fault injection (``grace bench chaos``)."""
        with self._lock:
            if name == "redis":
                if self.redis is None:
                    raise ValueError("this stack uses an external Redis (redis_url): it cannot kill it")
                self.redis.kill()
                return
            if name not in self.processes:
                raise ValueError(f"no service {name!r} in this stack; it runs {', '.join(self.processes)}")
            process = self.processes[name].process
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        log.warning("event=service_killed name=%s pid=%s", name, process.pid)

    def healthy(self) -> bool:
        """Every child alive and answering its health URL, and the embedded Redis up."""
        if self.redis is not None and not self.redis.alive():
            return False
        for process in list(self.processes.values()):
            try:
                process.wait_healthy(timeout=0, interval=0)
            except (RuntimeError, TimeoutError):
                return False
        return True

    def wait_healthy(self, timeout: float = 600.0, interval: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack not healthy after {timeout:.0f}s; logs in {self.dir / 'logs'}")
            time.sleep(interval)

    def down(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        stack_file = self.dir / "stack.json"
        if stack_file.exists():
            stack_file.unlink()

    def __enter__(self) -> StackInfo:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
