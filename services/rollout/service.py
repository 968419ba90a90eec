"""The running rollout service: vLLM child process + gateway (uvicorn) + adapter manager thread.

The gateway listens at once (``/health`` answers 503 while vLLM loads, so a
Kubernetes readiness probe waits); a supervisor thread waits for vLLM, then
starts the adapter manager, and stops the gateway if vLLM dies (exit code 1,
so the orchestrator restarts the pod). SIGINT/SIGTERM stop the gateway, then
the manager, then vLLM's whole process group.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from shared.local_redis import connect, free_port
from shared.process import ServiceProcess
from shared.settings import grace_home

from services.rollout.config import RolloutSettings
from services.rollout.registry import AdapterRegistry

log = logging.getLogger(__name__)


def resolve_model(settings: RolloutSettings) -> str:
    if settings.policy_model:
        return settings.policy_model
    from shared.tiny_models import ensure_model_set

    return str(ensure_model_set(settings.tiny_preset).policy)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def start_vllm(settings: RolloutSettings, model: str) -> tuple[ServiceProcess, str]:
    """Starts vLLM's OpenAI server as a child (dies with us: parent-death signal via setpriv when present)."""
    from services.rollout.vllm_server import vllm_command

    port = settings.vllm_port or free_port(settings.vllm_host)
    argv, env = vllm_command(settings, model, port, cuda=cuda_available())
    if shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
    url = f"http://{settings.vllm_host}:{port}"
    log_path = grace_home() / "logs" / f"vllm-{settings.replica}-{port}.log"
    log.info("event=vllm_starting url=%s model=%s log=%s argv=%s", url, model, log_path, " ".join(argv))
    process = ServiceProcess("vllm", argv, log_path, health_url=f"{url}/health", env={**env, "PYTHONUNBUFFERED": "1"})
    return process.start(), url


class RolloutService:
    def __init__(self, settings: RolloutSettings):
        self.settings = settings
        self.vllm: ServiceProcess | None = None
        self.manager = None
        self.server = None
        self.exit_code = 0
        self._stopping = False

    def run(self) -> int:
        import uvicorn

        from services.rollout.gateway import create_app

        settings = self.settings
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        if settings.vllm_url:
            vllm_url = settings.vllm_url
        else:
            self.vllm, vllm_url = start_vllm(settings, resolve_model(settings))
        registry = AdapterRegistry(settings.served_model_name)
        app = create_app(settings, registry, vllm_url)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        supervisor = threading.Thread(target=self._supervise, args=(registry, vllm_url), name="rollout-supervisor", daemon=True)
        supervisor.start()
        log.info("event=gateway_listening host=%s port=%d vllm=%s replica=%s", settings.host, settings.port, vllm_url, settings.replica)
        try:
            self.server.run()
        finally:
            self._stopping = True
            if self.manager is not None:
                self.manager.stop()
            if self.vllm is not None:
                self.vllm.stop()
        log.info("event=rollout_stopped exit_code=%d", self.exit_code)
        return self.exit_code

    def _supervise(self, registry: AdapterRegistry, vllm_url: str) -> None:
        from services.rollout.adapters import AdapterManager

        settings = self.settings
        try:
            if self.vllm is not None:
                started = time.monotonic()
                self.vllm.wait_healthy(timeout=settings.vllm_startup_timeout_s)
                log.info("event=vllm_ready startup_s=%.1f", time.monotonic() - started)
            if settings.redis_url:
                self.manager = AdapterManager(
                    connect(settings.redis_url), registry, vllm_url, adapter_root=settings.adapter_root,
                    replica=settings.replica, max_rank=settings.max_lora_rank, block_ms=settings.adapter_poll_ms,
                )  # fmt: skip
                self.manager.start_thread()
            else:
                log.warning("event=no_redis detail=no REDIS_URL: adapter events are not consumed, policy stays the base model")
            while self.vllm is None or self.vllm.alive():
                if self.server.should_exit:
                    return
                time.sleep(1.0)
            log.error("event=vllm_died rc=%s log=%s", self.vllm.process.returncode, Path(self.vllm.log_path))
        except Exception as exc:  # noqa: BLE001 - any startup failure must stop the service
            if self._stopping:
                return
            log.error("event=rollout_startup_failed error=%s detail=%s", type(exc).__name__, str(exc)[-2000:])
        if self._stopping:
            return
        self.exit_code = 1
        self.server.should_exit = True
