"""Judge HTTP API: ``POST /v1/judge``, ``POST /v1/judge/batch``, ``POST /v1/judge/pairwise``, ``GET /health``.

An answer that cannot be parsed after the parse retries is a 200 with null scores and ``parse_error``.
Errors, in OpenAI's shape (``shared.http_edge``): 422 on bad input (the message names the field), 502 when
the backend fails after the SDK's retries (the message says why), 401 on a wrong key, 500 for a bug in the
judge itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError

from services.judge.client import JudgeBackendError, JudgeClient
from services.judge.config import JudgeSettings
from services.judge.protocol import (
    JudgeBatchItem,
    JudgeBatchRequest,
    JudgeBatchResponse,
    JudgeRequest,
    Judgment,
    PairwiseJudgment,
    PairwiseRequest,
    Usage,
)
from shared.http_edge import APIError, BodyLimit, bearer_key, error_responses, field_error, install_error_handlers, limit_schema

log = logging.getLogger(__name__)


def create_app(settings: JudgeSettings | None = None) -> FastAPI:
    settings = settings or JudgeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = JudgeClient(settings)
        log.info("event=judge_ready backend=%s model=%s cache=%s", settings.base_url, settings.model, bool(settings.cache_url))
        yield
        await app.state.client.close()

    app = FastAPI(title="GRACE-KTO judge", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    authorized = [Depends(bearer_key(settings.api_key_value()))]
    errors = error_responses(400, *([401] if settings.api_key_value() else []), 413, 422)
    too_long = {"maxLength": settings.max_input_chars}
    texts = {
        "JudgeRequest": ("instruction", "response", "reference"),
        "PairwiseRequest": ("instruction", "response_a", "response_b", "reference"),
    }
    limit_schema(
        app,
        {
            **{model: {field: too_long for field in fields} for model, fields in texts.items()},
            "JudgeBatchRequest": {"items": {"maxItems": settings.max_batch_items}},
        },
    )

    def check_sizes(item: JudgeRequest | PairwiseRequest, where: tuple) -> None:
        for field in texts[type(item).__name__]:
            if len(getattr(item, field) or "") > settings.max_input_chars:
                too_long = f"longer than {settings.max_input_chars} characters"
                raise RequestValidationError([field_error((*where, field), too_long, "too_long")])

    @app.get("/health")
    async def health() -> dict:
        cache = app.state.client.cache
        return {"status": "ok", "model": settings.model, "cache": cache.counters() if cache else None}

    @app.post("/v1/judge", dependencies=authorized, responses={**errors, **error_responses(502)})
    async def judge(body: JudgeRequest) -> Judgment:
        check_sizes(body, ())
        started = time.perf_counter()
        try:
            result = await app.state.client.judge(body.instruction, body.response, body.reference)
        except JudgeBackendError as exc:
            log.warning("event=judge_failed reason=%r", str(exc)[:300])
            raise APIError(502, str(exc)) from exc
        log.info(
            "event=judged score=%s cached=%s tokens=%d seconds=%.2f",
            result.score,
            result.cached,
            result.usage.total_tokens,
            time.perf_counter() - started,
        )
        return result

    @app.post("/v1/judge/pairwise", dependencies=authorized, responses={**errors, **error_responses(502)})
    async def judge_pairwise(body: PairwiseRequest) -> PairwiseJudgment:
        check_sizes(body, ())
        started = time.perf_counter()
        try:
            result = await app.state.client.judge_pairwise(body.instruction, body.response_a, body.response_b, body.reference)
        except JudgeBackendError as exc:
            log.warning("event=judge_pairwise_failed reason=%r", str(exc)[:300])
            raise APIError(502, str(exc)) from exc
        log.info(
            "event=judged_pairwise winner=%s consistent=%s cached=%s tokens=%d seconds=%.2f",
            result.winner,
            result.consistent,
            result.cached,
            result.usage.total_tokens,
            time.perf_counter() - started,
        )
        return result

    @app.post("/v1/judge/batch", dependencies=authorized, responses=errors)
    async def judge_batch(body: JudgeBatchRequest) -> JudgeBatchResponse:
        if len(body.items) > settings.max_batch_items:
            too_many = f"more than {settings.max_batch_items} items"
            raise RequestValidationError([field_error(("items",), too_many, "too_long")])
        for index, item in enumerate(body.items):
            check_sizes(item, ("items", index))

        async def one(index: int, item: JudgeRequest) -> JudgeBatchItem:
            try:
                return JudgeBatchItem(
                    index=index, result=await app.state.client.judge(item.instruction, item.response, item.reference)
                )
            except JudgeBackendError as exc:
                return JudgeBatchItem(index=index, error=str(exc))
            except Exception as exc:  # one broken item must not fail the others
                log.exception("event=judge_unexpected_error index=%d", index)
                return JudgeBatchItem(index=index, error=f"judge failed: {type(exc).__name__}")

        started = time.perf_counter()
        items = await asyncio.gather(*(one(i, item) for i, item in enumerate(body.items)))
        failed = sum(item.error is not None for item in items)
        log.info("event=judged_batch items=%d failed=%d seconds=%.2f", len(items), failed, time.perf_counter() - started)
        usage = sum((item.result.usage for item in items if item.result), Usage())
        return JudgeBatchResponse(items=list(items), usage=usage)

    return app
