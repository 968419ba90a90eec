"""Judge HTTP API: ``POST /v1/judge``, ``POST /v1/judge/batch``, ``GET /health``.

Errors: 422 on bad input (the message names the field), 502 when the backend's
answer cannot be judged after retries (the message says why), 401 on a wrong
key; never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse

from services.judge.client import JudgeBackendError, JudgeClient
from services.judge.config import JudgeSettings
from shared.schemas import JudgeBatchItem, JudgeBatchRequest, JudgeBatchResponse, JudgeRequest, JudgeResult

log = logging.getLogger(__name__)


def create_app(settings: JudgeSettings | None = None) -> FastAPI:
    settings = settings or JudgeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = JudgeClient(settings)
        log.info("event=judge_ready backend=%s model=%s", settings.base_url, settings.model)
        yield
        await app.state.client.close()

    app = FastAPI(title="GRACE-KTO judge", lifespan=lifespan)
    app.state.settings = settings

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug must not look like a 500 hang
        log.exception("event=judge_unexpected_error path=%s", request.url.path)
        return JSONResponse(status_code=502, content={"detail": f"judge failed: {type(exc).__name__}"})

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = settings.server_api_key_value()
        if expected and not secrets.compare_digest(authorization or "", f"Bearer {expected}"):
            raise HTTPException(401, "missing or wrong bearer key")

    def check_sizes(item: JudgeRequest, where: str) -> None:
        for field in ("instruction", "response"):
            if len(getattr(item, field)) > settings.max_input_chars:
                raise HTTPException(422, f"{where}{field}: longer than {settings.max_input_chars} characters")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model}

    @app.post("/v1/judge", dependencies=[Depends(authorize)])
    async def judge(body: JudgeRequest) -> JudgeResult:
        check_sizes(body, "")
        started = time.perf_counter()
        try:
            result = await app.state.client.judge(body.instruction, body.response)
        except JudgeBackendError as exc:
            log.warning("event=judge_failed reason=%r", str(exc)[:300])
            raise HTTPException(502, str(exc)) from exc
        log.info("event=judged score=%.1f seconds=%.2f", result.score, time.perf_counter() - started)
        return result

    @app.post("/v1/judge/batch", dependencies=[Depends(authorize)])
    async def judge_batch(body: JudgeBatchRequest) -> JudgeBatchResponse:
        if len(body.items) > settings.max_batch_items:
            raise HTTPException(422, f"items: more than {settings.max_batch_items} items")
        for index, item in enumerate(body.items):
            check_sizes(item, f"items[{index}].")

        async def one(index: int, item: JudgeRequest) -> JudgeBatchItem:
            try:
                return JudgeBatchItem(index=index, result=await app.state.client.judge(item.instruction, item.response))
            except JudgeBackendError as exc:
                return JudgeBatchItem(index=index, error=str(exc))
            except Exception as exc:  # one broken item must not fail the others
                log.exception("event=judge_unexpected_error index=%d", index)
                return JudgeBatchItem(index=index, error=f"judge failed: {type(exc).__name__}")

        started = time.perf_counter()
        items = await asyncio.gather(*(one(i, item) for i, item in enumerate(body.items)))
        failed = sum(item.error is not None for item in items)
        log.info("event=judged_batch items=%d failed=%d seconds=%.2f", len(items), failed, time.perf_counter() - started)
        return JudgeBatchResponse(items=list(items))

    return app
