"""HTTP API of the reward service (DESIGN.md section 3): thin routes over the scorer and calibration.

Models load in a background thread at startup (``/ready`` says when); scoring
runs in worker threads, at most ``max_concurrency`` at once, with at most
``max_queue`` requests waiting; beyond that a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.reward.config import RewardSettings
from services.reward.openrlhf import group_by_prompt, prefix_mismatches, remote_reward
from services.reward.scorer import ComputeStats, Scorer, score_response
from services.reward.telemetry import Telemetry
from shared.group_health import Outcome, group_health
from shared.http_edge import APIError, BodyLimit, bearer_key, error_responses, field_error, install_error_handlers, limit_schema
from shared.schemas import CalibrateRequest, GetRewardRequest, GetRewardResponse, ScoreRequest, ScoreResponse

log = logging.getLogger(__name__)


class Busy(Exception):
    """No scoring slot and the wait queue is full."""


class Admission:
    """``slots`` jobs at once, ``queue`` more waiting; the rest are turned away."""

    def __init__(self, slots: int, queue: int, telemetry: Telemetry):
        self.slots = asyncio.Semaphore(slots)
        self.queue = queue
        self.waiting = 0
        self.telemetry = telemetry

    @asynccontextmanager
    async def enter(self):
        if self.slots.locked() and self.waiting >= self.queue:
            raise Busy
        self.waiting += 1
        self.telemetry.waiting.set(self.waiting)
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.telemetry.waiting.set(self.waiting)
        self.telemetry.in_flight.inc()
        try:
            yield
        finally:
            self.telemetry.in_flight.dec()
            self.slots.release()


@dataclass
class ServiceState:
    settings: RewardSettings
    telemetry: Telemetry
    admission: Admission
    scorer: Scorer | None = None
    load_error: str | None = None
    loaded: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)


def check_score_limits(body: ScoreRequest, s: RewardSettings) -> None:
    """422 naming the field for every limit a valid body can still exceed."""
    errors = []
    if len(body.groups) > s.max_groups:
        errors.append(field_error(("groups",), f"at most {s.max_groups} groups per request, got {len(body.groups)}"))
    for g, group in enumerate(body.groups[: s.max_groups]):
        if len(group.query) > s.max_query_chars:
            errors.append(field_error(("groups", g, "query"), f"query longer than {s.max_query_chars} characters"))
        if len(group.responses) > s.max_responses:
            errors.append(
                field_error(
                    ("groups", g, "responses"), f"at most {s.max_responses} responses per group, got {len(group.responses)}"
                )
            )
        for r, text in enumerate(group.responses[: s.max_responses]):
            if len(text) > s.max_response_chars:
                errors.append(
                    field_error(("groups", g, "responses", r), f"response longer than {s.max_response_chars} characters")
                )
    if errors:
        raise RequestValidationError(errors[:20])


def check_get_reward_limits(body: GetRewardRequest, s: RewardSettings) -> None:
    """422 naming the field: every query starts with its prompt, and the groups the prompts form keep
    /v1/score's limits (max_groups distinct prompts, max_responses samples per prompt, text sizes)."""
    errors = [
        field_error(("query", i), f"does not start with prompts.{i}: the response is the query without its prompt")
        for i in prefix_mismatches(body.query, body.prompts)[:20]
    ]
    first: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for i, prompt in enumerate(body.prompts):
        first.setdefault(prompt, i)
        sizes[prompt] = sizes.get(prompt, 0) + 1
    if len(first) > s.max_groups:
        errors.append(
            field_error(("prompts",), f"at most {s.max_groups} distinct prompts (groups) per request, got {len(first)}")
        )
    for prompt, i in list(first.items())[: s.max_groups]:
        if len(prompt) > s.max_query_chars:
            errors.append(field_error(("prompts", i), f"prompt longer than {s.max_query_chars} characters"))
        if sizes[prompt] > s.max_responses:
            errors.append(
                field_error(("prompts", i), f"{sizes[prompt]} samples share this prompt; at most {s.max_responses} per group")
            )
    for i, (query, prompt) in enumerate(zip(body.query, body.prompts)):
        if query.startswith(prompt) and len(query) - len(prompt) > s.max_response_chars:
            errors.append(field_error(("query", i), f"response longer than {s.max_response_chars} characters"))
    if errors:
        raise RequestValidationError(errors[:20])


def check_calibrate_body(body: CalibrateRequest, s: RewardSettings) -> None:
    errors = []
    if len(body.groups) > s.max_groups:
        errors.append(field_error(("groups",), f"at most {s.max_groups} groups per request, got {len(body.groups)}"))
    for g, group in enumerate(body.groups[: s.max_groups]):
        if len(group.responses) > s.max_responses:
            errors.append(field_error(("groups", g, "responses"), f"at most {s.max_responses} responses per group"))
        for r, item in enumerate(group.responses[: s.max_responses]):
            loc = ("groups", g, "responses", r, "metrics")
            if item.parsed and item.metrics is None:
                errors.append(field_error(loc, "metrics are required when parsed is true", "missing"))
            elif item.parsed and not all(math.isfinite(v) for v in item.metrics.model_dump().values()):
                errors.append(field_error(loc, "metrics must be finite numbers", "finite_number"))
    if errors:
        raise RequestValidationError(errors[:20])


def _load_models(state: ServiceState) -> None:
    try:
        state.scorer = Scorer(state.settings)
        state.telemetry.ready.set(1)
    except Exception as exc:  # reported by /ready; the process stays up for /health and /v1/calibrate
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("event=models_failed")
    finally:
        state.loaded.set()


def _run_worker(state: ServiceState) -> None:
    import redis

    from services.reward.worker import RewardWorker
    from shared.local_redis import connect

    state.loaded.wait()
    while state.scorer is not None and not state.stop.is_set():
        try:
            client = connect(state.settings.redis_url)
            RewardWorker(client, state.scorer.score, state.settings, state.telemetry).run(state.stop)
        except redis.RedisError as exc:  # Redis not up yet, or gone: keep trying, the API stays up
            log.warning("event=worker_redis_unavailable error=%s", exc)
            state.stop.wait(2.0)


def _start(state: ServiceState, target: Any, name: str) -> None:
    thread = threading.Thread(target=target, args=(state,), name=name, daemon=True)
    thread.start()
    state.threads.append(thread)


def create_app(settings: RewardSettings | None = None) -> FastAPI:
    settings = settings or RewardSettings()
    telemetry = Telemetry()
    state = ServiceState(settings, telemetry, Admission(settings.max_concurrency, settings.max_queue, telemetry))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _start(state, _load_models, "reward-models")
        if settings.worker and settings.redis_url:
            _start(state, _run_worker, "reward-worker")
        elif settings.worker:
            log.info("event=worker_disabled reason=no_redis_url")
        yield
        state.stop.set()
        for thread in state.threads:
            thread.join(timeout=10)

    app = FastAPI(
        title="GRACE-KTO reward service",
        version="0.1.0",
        description="Scores structured long-text responses (paper 3.3) and calibrates them (eq. 5-9).",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.state.reward = state
    authorized = [Depends(bearer_key(settings.api_key_value()))]
    errors = error_responses(400, *([401] if settings.api_key_value() else []), 413, 422)
    limit_schema(app, {
        "ScoreRequest": {"groups": {"maxItems": settings.max_groups}},
        "ScoreGroup": {
            "query": {"maxLength": settings.max_query_chars},
            "responses": {"maxItems": settings.max_responses, "items": {"maxLength": settings.max_response_chars}},
        },
        "CalibrateRequest": {"groups": {"maxItems": settings.max_groups}},
        "CalibrateGroup": {"responses": {"maxItems": settings.max_responses}},
        "GetRewardRequest": {
            "query": {"maxItems": settings.max_groups * settings.max_responses,
                      "items": {"maxLength": settings.max_query_chars + settings.max_response_chars}},
            "prompts": {"maxItems": settings.max_groups * settings.max_responses,
                        "items": {"maxLength": settings.max_query_chars}},
        },
    })  # fmt: skip

    def unavailable(detail: str) -> APIError:
        telemetry.rejected.inc()
        return APIError(503, detail, headers={"Retry-After": str(settings.retry_after_s)})

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")  # the route template, so labels stay bounded
        telemetry.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.get("/health", tags=["ops"])
    def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    not_ready = {"description": "models loading, or loading failed", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"enum": ["loading", "failed"]}, "error": {"type": ["string", "null"]}},
    }}}}  # fmt: skip

    @app.get("/ready", tags=["ops"], responses={503: not_ready})
    def ready() -> JSONResponse:
        """Readiness: 200 once the models are loaded, 503 while loading or if loading failed."""
        if state.scorer is not None:
            scorer = state.scorer
            body = {"status": "ready", "device": str(scorer.device), "dtype": str(scorer.dtype).removeprefix("torch.")}
            return JSONResponse(body)
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus metrics, in Prometheus' text format."""
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    async def score_groups(
        route: str, groups: list[tuple[str, list[str]]], finish_reasons: list[list[str | None] | None]
    ) -> ScoreResponse:
        """The scoring path of every scoring route: admission (503 when busy or loading), the scorer, then
        eq. 5-9 over the request's groups as one dataset; records the request's group health."""
        scorer = state.scorer
        if scorer is None:
            raise unavailable(f"models not loaded ({'failed' if state.load_error else 'loading'})")
        started = time.perf_counter()
        try:
            async with state.admission.enter():
                scored, stats = await asyncio.get_running_loop().run_in_executor(None, scorer.score_with_stats, groups)
        except Busy:
            raise unavailable("scoring queue full, retry later") from None
        seconds = time.perf_counter() - started
        telemetry.latency.labels(route).observe(seconds)
        _count(telemetry, stats, scored)
        log.info(
            "event=scored route=%s groups=%d responses=%d seconds=%.3f",
            route, len(groups), sum(len(m) for m in scored), seconds,
        )  # fmt: skip
        response = score_response(
            [(query, m) for (query, _), m in zip(groups, scored)], degenerate_groups=settings.degenerate_groups
        )
        for finishes, result in zip(finish_reasons, response.groups):  # echoed: 'length' marks a truncated response
            for item, finish in zip(result.results, finishes or []):
                item.finish_reason = finish
        outcomes = [[Outcome.from_row(r.model_dump()) for r in g.results] for g in response.groups]
        telemetry.record_health("request", group_health(outcomes))
        return response

    @app.post(
        "/v1/score", response_model=ScoreResponse, tags=["reward"], dependencies=authorized,
        responses={**errors, **error_responses(503)},
    )  # fmt: skip
    async def score(body: ScoreRequest) -> ScoreResponse:
        """Scores every response (metrics of paper 3.3), then calibrates the request's groups as one dataset (eq. 5-9)."""
        check_score_limits(body, settings)
        groups = [(g.query, g.responses) for g in body.groups]
        return await score_groups("/v1/score", groups, [g.finish_reasons for g in body.groups])

    @app.post(
        "/get_reward", response_model=GetRewardResponse, tags=["integrations"], dependencies=authorized,
        responses={**errors, **error_responses(503)},
    )  # fmt: skip
    async def get_reward(body: GetRewardRequest) -> GetRewardResponse:
        """OpenRLHF's remote reward (``--remote_rm_url``): samples sharing a prompt form a group, scored and
        calibrated as /v1/score does; ``rewards`` = the group Z, ``scores`` = the weight W, ``extra_logs`` = the
        metrics per sample."""
        check_get_reward_limits(body, settings)
        groups = group_by_prompt(body.query, body.prompts)
        scored = await score_groups("/get_reward", list(zip(groups.prompts, groups.responses)), [None] * len(groups.prompts))
        return remote_reward(groups, scored)

    @app.post("/v1/calibrate", response_model=ScoreResponse, tags=["reward"], dependencies=authorized, responses=errors)
    def calibrate(body: CalibrateRequest) -> ScoreResponse:
        """Rank-sum, group Z and global weights (eq. 5-9) for metrics computed elsewhere; no model needed."""
        check_calibrate_body(body, settings)
        groups = [(None, [r.metrics if r.parsed else None for r in g.responses]) for g in body.groups]
        return score_response(groups, degenerate_groups=settings.degenerate_groups)

    return app


def _count(telemetry: Telemetry, stats: ComputeStats, scored: list[list]) -> None:
    parsed = sum(m is not None for ms in scored for m in ms)
    telemetry.responses.labels("true").inc(parsed)
    telemetry.responses.labels("false").inc(sum(len(ms) for ms in scored) - parsed)
    telemetry.tokens.labels("causal_lm").inc(stats.lm_tokens)
    telemetry.tokens.labels("encoder").inc(stats.encoder_tokens)
    telemetry.flops.inc(stats.flops)
