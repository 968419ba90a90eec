"""A thin OpenAI-compatible gateway in front of vLLM: the stable model name `policy`.

Why a gateway and not vLLM alone: vLLM serves each LoRA adapter under its own
name and cannot re-point a name atomically (an in-place reload under the same
name can reuse stale prefix-cache blocks, vLLM #42125). So every adapter is
loaded under a new versioned name, and this gateway maps `policy` to the
newest one at the moment a request arrives. Requests already running keep
their version until they finish (refcounted in ``AdapterRegistry``), so a swap
has no window where `policy` is missing or a request fails. It is also the
one place for the bearer API key, request limits, ``/health`` on the port
users call, ``GET /admin/adapters`` and ``GET /admin/rope`` (the served RoPE setting).

It stays thin: the request body is parsed only to rewrite ``model`` (and
check ``n``); responses, streamed (SSE) or not, are passed through byte for
byte. The version that served a request is reported in the response headers
``x-grace-adapter-version`` and ``x-grace-model``; the body keeps vLLM's
versioned model name. vLLM's own LoRA admin routes are not exposed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.rollout.config import RolloutSettings
from services.rollout.registry import AdapterRegistry
from shared.http_edge import APIError, BodyLimit, bearer_key, error_responses, install_error_handlers

log = logging.getLogger(__name__)

BLOCKED_PATHS = {"load_lora_adapter", "unload_lora_adapter"}
PASSED_HEADERS = ("content-type", "content-length", "content-encoding", "x-request-id")


class UpstreamResponse(StreamingResponse):
    """vLLM's response streamed through; ``on_close`` runs however the stream ends (done, error, disconnect)."""

    def __init__(self, upstream: httpx.Response, headers: dict[str, str], on_close: Callable[[], None]):
        super().__init__(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers)
        self.upstream = upstream
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            try:
                await self.upstream.aclose()  # closing aborts the request in vLLM if the client went away
            except BaseException:  # noqa: BLE001 - already cancelled: the connection is dropped anyway
                pass


def create_app(
    settings: RolloutSettings, registry: AdapterRegistry, vllm_url: str, ready: Callable[[], bool] = lambda: True
) -> FastAPI:
    """``ready`` says whether the service finished starting (vLLM warmed up); /health is 503 before."""
    vllm_url = vllm_url.rstrip("/")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=settings.max_in_flight + 32, max_keepalive_connections=settings.max_in_flight)
        timeout = httpx.Timeout(settings.upstream_connect_timeout_s, read=settings.upstream_timeout_s)
        async with httpx.AsyncClient(base_url=vllm_url, limits=limits, timeout=timeout) as client:
            app.state.client = client
            yield

    app = FastAPI(title="GRACE-KTO rollout gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.in_flight = 0
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    authorized = [Depends(bearer_key(settings.api_key_value()))]
    auth_errors = error_responses(401) if settings.api_key_value() else {}
    status = {
        "type": "object",
        "properties": {"status": {"enum": ["ok", "starting", "unavailable"]}, "policy": {"type": "string"}},
    }
    unhealthy = {"description": "starting, or vLLM unhealthy", "content": {"application/json": {"schema": status}}}
    # The proxied routes: the gateway reads `model` and `n`, vLLM the rest of the body (its own contract).
    proxied_body = {"type": "object", "additionalProperties": True, "properties": {
        "model": {"type": "string", "description": f"'{settings.policy_name}' = the newest adapter; other names pass through"},
        "n": {"type": "integer", "minimum": 1, "maximum": settings.max_n, "description": "responses per prompt"},
    }}  # fmt: skip
    proxied = {
        "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": proxied_body}}}},
        "responses": {
            200: {"description": "vLLM's answer, passed through (JSON, or server-sent events when streaming)",
                  "content": {"application/json": {}, "text/event-stream": {}}},
            **auth_errors, **error_responses(400, 404, 413, 429, 502),
        },
    }  # fmt: skip

    @app.get("/health", responses={503: unhealthy})
    async def health(request: Request) -> JSONResponse:
        """200 only while vLLM itself is healthy (readiness and liveness on the users' port)."""
        if not ready():
            return JSONResponse({"status": "starting", "policy": registry.current.version}, status_code=503)
        try:
            ok = (await request.app.state.client.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            ok = False
        body = {"status": "ok" if ok else "unavailable", "policy": registry.current.version}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/admin/adapters", dependencies=authorized, responses=auth_errors)
    async def admin_adapters() -> dict:
        return {"policy": settings.policy_name, "replica": settings.replica, **registry.snapshot()}

    @app.get("/admin/rope", dependencies=authorized, responses=auth_errors)
    async def admin_rope() -> dict:
        """The RoPE setting this replica serves (paper 3.6), for a run to check against (``rope_check``)."""
        return {"replica": settings.replica, **settings.rope().model_dump()}

    @app.get("/v1/models", dependencies=authorized, responses={**auth_errors, **error_responses(503)})
    async def models(request: Request) -> JSONResponse:
        try:
            upstream = await request.app.state.client.get("/v1/models")
            listing = upstream.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise APIError(503, f"vLLM unavailable: {exc}") from exc
        current = registry.current
        card = {
            "id": settings.policy_name,
            "object": "model",
            "created": int(current.loaded_at),
            "owned_by": "grace",
            "root": current.model,
            "parent": settings.served_model_name,
            "max_model_len": next((m.get("max_model_len") for m in listing.get("data", [])), None),
            "adapter_version": current.version,
        }
        listing["data"] = [card] + listing.get("data", [])
        return JSONResponse(listing)

    @app.post("/v1/chat/completions", dependencies=authorized, **proxied)
    async def chat_completions(request: Request) -> UpstreamResponse:
        return await proxy("chat/completions", request)

    @app.post("/v1/completions", dependencies=authorized, **proxied)
    async def completions(request: Request) -> UpstreamResponse:
        return await proxy("completions", request)

    @app.post("/v1/{path:path}", dependencies=authorized, **proxied)
    async def proxy(path: str, request: Request) -> UpstreamResponse:
        """Any other POST under /v1 passes through to vLLM (its own admin routes excepted)."""
        if path in BLOCKED_PATHS:
            raise APIError(404, f"/v1/{path} is not served by the gateway")
        body = await request.body()  # at most max_body_bytes: BodyLimit answered 413 above
        state = request.app.state
        if state.in_flight >= settings.max_in_flight:
            raise APIError(429, f"more than {settings.max_in_flight} requests in flight")

        payload = _json_object(body)
        if payload is None:  # vLLM would answer FastAPI's {"detail": ...}, not OpenAI's error shape
            raise APIError(400, "request body must be a JSON object")
        n = payload.get("n", 1)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= settings.max_n):
            raise APIError(400, f"n must be an integer in [1, {settings.max_n}]", param="n")
        record = None
        if payload.get("model") == settings.policy_name:
            record = registry.acquire()
            payload["model"] = record.model
            body = json.dumps(payload).encode()  # ASCII escapes: lone surrogates cannot break the encode

        state.in_flight += 1
        closed = False

        def on_close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                state.in_flight -= 1
                if record is not None:
                    registry.release(record.model)

        started = time.perf_counter()
        try:
            upstream = await state.client.send(
                state.client.build_request("POST", f"/v1/{path}", content=body, headers={"content-type": "application/json"}),
                stream=True,
            )
        except httpx.HTTPError as exc:
            on_close()
            log.warning("event=upstream_error path=%s error=%s", path, type(exc).__name__)
            raise APIError(502, f"vLLM did not answer: {type(exc).__name__}") from exc
        headers = {k: v for k in PASSED_HEADERS if (v := upstream.headers.get(k)) is not None}
        if record is not None:
            headers["x-grace-adapter-version"] = record.version
            headers["x-grace-model"] = record.model
        log.debug("event=proxied path=%s status=%s model=%s ttfb_ms=%.1f", path, upstream.status_code,
                  record.model if record else "-", 1000 * (time.perf_counter() - started))  # fmt: skip
        return UpstreamResponse(upstream, headers, on_close)

    return app


def _json_object(body: bytes) -> dict | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
