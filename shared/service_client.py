"""Clients of the project's HTTP services, sync and async: one retry policy for every caller.

A busy service (429 or 503: queue full, models loading) is retried after its
``Retry-After`` (``retry-after-ms``, seconds or an HTTP date), up to
``busy_retries`` times; a transport error (refused, reset, timed out) up to
``transport_retries`` times, ~1 s apart; any other status raises
``ServiceError`` with the service's own message (OpenAI's
``{"error": {"message"}}`` shape), so a 422 names the bad field.

``RewardClient`` adds the reward service's typed calls (``POST /v1/score``,
``POST /v1/calibrate``): evaluation, `grace score` and the TRL reward function
(``shared/integrations/trl.py``) score through it. Evaluation posts to the
judge service with the plain ``AsyncServiceClient``.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Callable, Mapping, Sequence

import httpx

from shared.schemas import Metrics, ScoreGroup, ScoreResponse

TRANSPORT_WAIT_S = 1.0
DEFAULT_RETRY_AFTER_S = 2.0  # a 429/503 without the header
BUSY = (429, 503)
MAX_RETRY_AFTER_S = 300.0  # a wrong header must not park a client for hours


def error_message(reply: httpx.Response) -> str:
    """The service's error message (OpenAI's ``{"error": {"message"}}`` shape), else the start of the body."""
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:500]


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds a busy service asked us to wait: ``retry-after-ms``, ``retry-after`` (seconds or HTTP date)."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name, "nan")) / scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ServiceError(RuntimeError):
    """A request the service refused or never answered; ``status_code`` is None when it was unreachable."""

    def __init__(self, status_code: int | None, message: str):
        super().__init__(message)
        self.status_code = status_code


def score_body(groups: Sequence[ScoreGroup | tuple[str, list[str]]]) -> dict:
    as_groups = [g if isinstance(g, ScoreGroup) else ScoreGroup(query=g[0], responses=g[1]) for g in groups]
    return {"groups": [g.model_dump(exclude_none=True) for g in as_groups]}


def calibrate_body(groups: Sequence[Sequence[Metrics | None]]) -> dict:
    """None = an unparsed response (W = -1, outside the ranks)."""
    items = [[{"parsed": m is not None, **({"metrics": m.model_dump()} if m else {})} for m in g] for g in groups]
    return {"groups": [{"responses": g} for g in items]}


class RetryBudget:
    """One request's attempts: how long to wait before the next one, or the error that ends them."""

    def __init__(self, url: str, busy_retries: int, transport_retries: int):
        self.url, self.busy_left, self.transport_left = url, busy_retries, transport_retries

    def after_transport_error(self, exc: httpx.TransportError) -> float:
        if self.transport_left <= 0:
            raise ServiceError(None, f"{self.url} unreachable: {exc!r}") from exc
        self.transport_left -= 1
        return TRANSPORT_WAIT_S

    def after_reply(self, reply: httpx.Response) -> float | None:
        """None: the reply is the answer; else the seconds to wait before retrying."""
        if reply.status_code == 200:
            return None
        if reply.status_code in BUSY and self.busy_left > 0:
            self.busy_left -= 1
            wait = retry_after_seconds(reply.headers)
            return min(DEFAULT_RETRY_AFTER_S if wait is None else wait, MAX_RETRY_AFTER_S)
        busy = " (still busy after the retries)" if reply.status_code in BUSY else ""
        hint = " (check the API key)" if reply.status_code == 401 else ""
        raise ServiceError(reply.status_code, f"{self.url} answered {reply.status_code}{busy}{hint}: {error_message(reply)}")


class _Base:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        busy_retries: int = 30,
        transport_retries: int = 3,
        on_reply: Callable[[httpx.Response], None] | None = None,
        max_connections: int = 100,
    ):
        """``on_reply`` sees every HTTP reply, read, 503s included (a benchmark counts them with it)."""
        self.url = url.rstrip("/")
        self.busy_retries, self.transport_retries, self.on_reply = busy_retries, transport_retries, on_reply
        self._options = {
            "base_url": self.url,
            "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
            "timeout": httpx.Timeout(timeout, connect=10.0),
            "limits": httpx.Limits(max_connections=max_connections),
        }

    def _budget(self, path: str) -> RetryBudget:
        return RetryBudget(self.url + path, self.busy_retries, self.transport_retries)

    def _seen(self, reply: httpx.Response) -> None:
        if self.on_reply is not None:
            self.on_reply(reply)


class ServiceClient(_Base):
    """Blocking client; use as a context manager (one connection pool)."""

    def __init__(self, url: str, api_key: str | None = None, **options):
        super().__init__(url, api_key, **options)
        self.http = httpx.Client(**self._options)

    def post(self, path: str, body: dict) -> dict:
        """The JSON answer of ``POST path``, after the retries the module's docstring describes."""
        budget = self._budget(path)
        while True:
            try:
                reply = self.http.post(path, json=body)
            except httpx.TransportError as exc:
                time.sleep(budget.after_transport_error(exc))
                continue
            self._seen(reply)
            wait = budget.after_reply(reply)
            if wait is None:
                return reply.json()
            time.sleep(wait)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncServiceClient(_Base):
    """The same client for asyncio callers (evaluation, the load benchmark)."""

    def __init__(self, url: str, api_key: str | None = None, **options):
        super().__init__(url, api_key, **options)
        self.http = httpx.AsyncClient(**self._options)

    async def post(self, path: str, body: dict) -> dict:
        budget = self._budget(path)
        while True:
            try:
                reply = await self.http.post(path, json=body)
            except httpx.TransportError as exc:
                await asyncio.sleep(budget.after_transport_error(exc))
                continue
            self._seen(reply)
            wait = budget.after_reply(reply)
            if wait is None:
                return reply.json()
            await asyncio.sleep(wait)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class RewardClient(ServiceClient):
    """The reward service's calls, typed."""

    def score(self, groups: Sequence[ScoreGroup | tuple[str, list[str]]]) -> ScoreResponse:
        """Metrics, rank sums, Z and weights; the request's groups are calibrated as one dataset (eq. 5-9)."""
        return ScoreResponse.model_validate(self.post("/v1/score", score_body(groups)))

    def calibrate(self, groups: Sequence[Sequence[Metrics | None]]) -> ScoreResponse:
        """Eq. 5-9 for metrics computed elsewhere; no model needed."""
        return ScoreResponse.model_validate(self.post("/v1/calibrate", calibrate_body(groups)))


class AsyncRewardClient(AsyncServiceClient):
    async def score(self, groups: Sequence[ScoreGroup | tuple[str, list[str]]]) -> ScoreResponse:
        return ScoreResponse.model_validate(await self.post("/v1/score", score_body(groups)))

    async def calibrate(self, groups: Sequence[Sequence[Metrics | None]]) -> ScoreResponse:
        return ScoreResponse.model_validate(await self.post("/v1/calibrate", calibrate_body(groups)))
