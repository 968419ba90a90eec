"""The judge backend: any OpenAI-compatible chat endpoint, called with the appendix E prompt.

Retries 429, 5xx, timeouts, lost connections and unparseable answers with
exponential backoff, honouring ``Retry-After`` (and ``retry-after-ms``); a
bounded number of requests is in flight at once. Every failure ends in a
``JudgeBackendError`` whose message says why, after a bounded time: at most
``(max_retries + 1)`` requests of ``timeout_s`` each plus the sleeps between them.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable, Mapping

import openai
from openai import AsyncOpenAI

from services.judge.config import JudgeSettings
from services.judge.parsing import JudgeParseError, judgement_json_schema, parse_judgement
from shared.prompts import judge_prompt
from shared.schemas import JudgeResult

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx


class JudgeBackendError(Exception):
    """No judgement could be had from the backend; the message is the reason (HTTP 502)."""


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, ``retry-after`` (seconds or HTTP date)."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            seconds = float(value) / 1000
            if math.isfinite(seconds):
                return max(0.0, seconds)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_seconds(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff ``base x 2^attempt`` capped at ``cap``, with 50-100 % jitter."""
    return min(cap, base * (2**attempt)) * (0.5 + 0.5 * rand())


def _status_reason(exc: openai.APIStatusError) -> str:
    message = getattr(exc, "message", "") or ""
    return f"backend answered HTTP {exc.status_code}: {message[:200]}"


def _mentions_response_format(exc: openai.APIStatusError) -> bool:
    text = f"{getattr(exc, 'message', '')} {getattr(exc, 'body', '')}".lower()
    return any(word in text for word in ("response_format", "json_schema", "structured output", "guided"))


class JudgeClient:
    """One judge backend; safe to share across concurrent tasks of one event loop."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self._openai = AsyncOpenAI(
            base_url=settings.base_url,
            api_key=settings.backend_api_key(),
            timeout=settings.timeout_s,
            max_retries=0,  # retries are ours: they honour Retry-After and end in a reason
        )
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self.structured_output = settings.structured_output

    async def close(self) -> None:
        await self._openai.close()

    def _format_kwargs(self) -> dict:
        if self.structured_output == "json_schema":
            schema = judgement_json_schema(self.settings.analysis_max_chars)
            return {"response_format": {"type": "json_schema", "json_schema": {"name": "judgement", "schema": schema}}}
        if self.structured_output == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {}

    async def judge(self, instruction: str, response: str) -> JudgeResult:
        """The appendix E judgement of ``response`` to ``instruction``; JudgeBackendError after retries."""
        s = self.settings
        messages = [{"role": "user", "content": judge_prompt(instruction, response)}]
        attempt, reason = 0, "no attempt made"
        while True:
            delay: float | None = None
            try:
                async with self._slots:
                    completion = await self._openai.chat.completions.create(
                        model=s.model,
                        messages=messages,
                        temperature=s.temperature,
                        max_tokens=s.max_tokens,
                        **({"frequency_penalty": s.frequency_penalty} if s.frequency_penalty else {}),
                        **self._format_kwargs(),
                    )
            except openai.BadRequestError as exc:
                if self.structured_output != "none" and _mentions_response_format(exc):
                    log.warning("event=judge_structured_output_rejected model=%s fallback=none", s.model)
                    self.structured_output = "none"  # ask again in plain text; not counted as a retry
                    continue
                raise JudgeBackendError(f"backend rejected the request: {_status_reason(exc)}") from exc
            except openai.APIStatusError as exc:
                if exc.status_code not in RETRYABLE_STATUS and exc.status_code < 500:
                    raise JudgeBackendError(_status_reason(exc)) from exc
                reason = _status_reason(exc)
                delay = retry_after_seconds(exc.response.headers)
                if delay is not None and delay > s.max_retry_after_s:
                    raise JudgeBackendError(
                        f"{reason}; Retry-After {delay:.0f}s exceeds max_retry_after_s={s.max_retry_after_s:g}"
                    ) from exc
            except openai.APITimeoutError:
                reason = f"backend timed out after {s.timeout_s:g}s"
            except openai.APIConnectionError as exc:
                reason = f"backend unreachable at {s.base_url}: {exc}"
            except Exception as exc:  # noqa: BLE001 - e.g. a 200 whose body is not JSON: the SDK raises ValueError
                reason = f"backend answer unusable: {type(exc).__name__}: {str(exc)[:200]}"
            else:
                text, finish_reason = _answer_text(completion)
                try:
                    return parse_judgement(text)
                except JudgeParseError as exc:
                    cut = " (answer cut at max_tokens)" if finish_reason == "length" else ""
                    reason = f"answer could not be judged: {exc}{cut}"
                    delay = 0.0
            if attempt >= s.max_retries:
                raise JudgeBackendError(f"{reason} (after {attempt + 1} attempts)")
            if delay is None:
                delay = backoff_seconds(attempt, s.backoff_base_s, s.backoff_max_s)
            log.warning("event=judge_retry attempt=%d delay_s=%.2f reason=%r", attempt + 1, delay, reason[:200])
            await asyncio.sleep(delay)
            attempt += 1


def _answer_text(completion: object) -> tuple[str | None, str | None]:
    """Content and finish reason of the first choice; (None, None) for a malformed answer."""
    try:
        choice = completion.choices[0]
        return choice.message.content, choice.finish_reason
    except (AttributeError, IndexError, TypeError):
        return None, None
