"""The judge backend: any OpenAI-compatible chat endpoint, asked with the appendix E prompt or its pairwise form.

Two kinds of failure, two policies:

- transport (429, 5xx, timeouts, lost connections): the openai SDK's own retries (``max_retries``:
  exponential backoff, Retry-After honoured up to 120 s). What still fails is a ``JudgeBackendError``
  whose message says why (the API's 502), after at most ``max_retries + 1`` requests of ``timeout_s``.
- an answer that holds no verdict: asked again, up to ``parse_retries`` times, then reported as a null
  score with the reason (``parse_error``). The answers were paid for and say something about the judge.

Every judgment carries the tokens the backend reported and their cost; a cached one (``cache_url``) cost
nothing. A bounded number of requests is in flight at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import openai
from openai import AsyncOpenAI
from pydantic import BaseModel

from services.judge.cache import JudgmentCache, judgment_key
from services.judge.config import JudgeSettings
from services.judge.pairwise import Order, combine_games, game_winner
from services.judge.parsing import (
    JudgeParseError,
    judgement_json_schema,
    pairwise_json_schema,
    parse_judgement,
    parse_pairwise,
)
from services.judge.prompts import judge_prompt, pairwise_prompt
from services.judge.protocol import JudgeResult, Judgment, PairwiseGame, PairwiseJudgment, PairwiseVerdict, Usage

log = logging.getLogger(__name__)

Verdict = TypeVar("Verdict", JudgeResult, PairwiseVerdict)


class JudgeBackendError(Exception):
    """No answer could be had from the backend; the message is the reason (HTTP 502)."""


class UnusableAnswer(Exception):
    """A 200 whose body is not a chat completion: treated like an answer that does not parse."""


@dataclass
class Answer(Generic[Verdict]):
    verdict: Verdict | None
    parse_error: str | None
    usage: Usage
    cached: bool


def _status_reason(exc: openai.APIStatusError) -> str:
    message = getattr(exc, "message", "") or ""
    return f"backend answered HTTP {exc.status_code}: {message[:200]}"


def _attempts(exc: openai.APIError) -> str:
    """How many requests the SDK made, from the retry count it sends with each one."""
    request = getattr(exc, "request", None)
    retries = request.headers.get("x-stainless-retry-count", "0") if request is not None else "0"
    count = int(retries) + 1 if retries.isdigit() else 1
    return f"after {count} attempt{'s' if count > 1 else ''}"


def _mentions_response_format(exc: openai.APIStatusError) -> bool:
    text = f"{getattr(exc, 'message', '')} {getattr(exc, 'body', '')}".lower()
    return any(word in text for word in ("response_format", "json_schema", "structured output", "guided"))


class JudgeClient:
    """One judge backend; safe to share across concurrent tasks of one event loop."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self._openai = AsyncOpenAI(
            base_url=settings.base_url,
            api_key=settings.backend_api_key_value(),
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
        )
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self.structured_output = settings.structured_output
        self.cache = JudgmentCache(settings.cache_url, settings.cache_ttl_s) if settings.cache_url else None

    async def close(self) -> None:
        await self._openai.close()
        if self.cache is not None:
            await self.cache.close()

    async def judge(self, instruction: str, response: str, reference: str | None = None) -> Judgment:
        """The appendix E judgement of ``response``; null scores when no answer parsed; JudgeBackendError."""
        prompt = judge_prompt(instruction, response, reference)
        schema = judgement_json_schema(self.settings.analysis_max_chars)
        answer = await self._ask(prompt, schema, JudgeResult, parse_judgement)
        scores = answer.verdict.model_dump() if answer.verdict else {}
        return Judgment(**scores, parse_error=answer.parse_error, usage=answer.usage, cached=answer.cached)

    async def judge_pairwise(
        self, instruction: str, response_a: str, response_b: str, reference: str | None = None
    ) -> PairwiseJudgment:
        """A against B, asked in both orders at once; an inconsistent pair is a tie; JudgeBackendError."""
        games = [
            asyncio.ensure_future(self._game("ab", instruction, response_a, response_b, reference)),
            asyncio.ensure_future(self._game("ba", instruction, response_b, response_a, reference)),
        ]
        try:
            ab, ba = await asyncio.gather(*games)
        except BaseException:
            for game in games:  # one order failed: the other's answer could not be used
                game.cancel()
            raise
        return combine_games(ab, ba)

    async def _game(self, order: Order, instruction: str, first: str, second: str, reference: str | None) -> PairwiseGame:
        prompt = pairwise_prompt(instruction, first, second, reference)
        schema = pairwise_json_schema(self.settings.analysis_max_chars)
        answer = await self._ask(prompt, schema, PairwiseVerdict, parse_pairwise)
        verdict = answer.verdict
        return PairwiseGame(
            order=order,
            winner=game_winner(verdict.winner, order) if verdict else None,
            analysis=verdict.analysis if verdict else "",
            parse_error=answer.parse_error,
            usage=answer.usage,
            cached=answer.cached,
        )

    async def _ask(
        self, prompt: str, schema: dict, kind: type[Verdict], parse: Callable[[str | None], Verdict]
    ) -> Answer[Verdict]:
        """The parsed verdict to ``prompt``, from the cache or the backend; asked again while it does not parse."""
        s = self.settings
        key = self._cache_key(prompt)
        if self.cache is not None and (stored := await self.cache.get(key)) is not None:
            try:
                return Answer(kind.model_validate_json(stored), None, Usage(), cached=True)
            except ValueError:  # an entry of another shape (an older version): judge again, overwrite it
                log.warning("event=judge_cache_unreadable key=%s", key[:16])
        usage, reason, answers = Usage(), "", s.parse_retries + 1
        for attempt in range(answers):
            try:
                completion = await self._complete(prompt, schema)
            except UnusableAnswer as exc:
                reason = f"backend answer unusable: {exc}"
            else:
                usage += self._usage(completion)
                text, finish_reason = _answer_text(completion)
                try:
                    verdict = parse(text)
                except JudgeParseError as exc:
                    cut = " (answer cut at max_tokens)" if finish_reason == "length" else ""
                    reason = f"answer could not be judged: {exc}{cut}"
                else:
                    if self.cache is not None:
                        await self.cache.put(key, verdict.model_dump_json())
                    return Answer(verdict, None, usage, cached=False)
            log.warning("event=judge_unparsed answer=%d of=%d reason=%r", attempt + 1, answers, reason[:200])
        return Answer(None, f"{reason} (after {answers} answers)", usage, cached=False)

    async def _complete(self, prompt: str, schema: dict) -> BaseModel:
        """One chat completion, the SDK retrying transport failures; JudgeBackendError when they persist."""
        s = self.settings
        while True:
            try:
                async with self._slots:
                    return await self._openai.chat.completions.create(
                        model=s.model,
                        messages=[{"role": "user", "content": prompt}],
                        temperature=s.temperature,
                        max_tokens=s.max_tokens,
                        **({"frequency_penalty": s.frequency_penalty} if s.frequency_penalty else {}),
                        **self._format_kwargs(schema),
                    )
            except openai.BadRequestError as exc:
                if self.structured_output != "none" and _mentions_response_format(exc):
                    log.warning("event=judge_structured_output_rejected model=%s fallback=none", s.model)
                    self.structured_output = "none"  # ask again in plain text; not a retry
                    continue
                raise JudgeBackendError(f"backend rejected the request: {_status_reason(exc)}") from exc
            except openai.APIStatusError as exc:
                raise JudgeBackendError(f"{_status_reason(exc)} ({_attempts(exc)})") from exc
            except openai.APITimeoutError as exc:
                raise JudgeBackendError(f"backend timed out after {s.timeout_s:g}s ({_attempts(exc)})") from exc
            except openai.APIConnectionError as exc:
                raise JudgeBackendError(f"backend unreachable at {s.base_url}: {exc} ({_attempts(exc)})") from exc
            except ValueError as exc:  # a 200 whose body is not JSON: the SDK's json() raises
                raise UnusableAnswer(f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    def _format_kwargs(self, schema: dict) -> dict:
        if self.structured_output == "json_schema":
            return {"response_format": {"type": "json_schema", "json_schema": {"name": "judgement", "schema": schema}}}
        if self.structured_output == "json_object":
            return {"response_format": {"type": "json_object"}}
        return {}

    def _cache_key(self, prompt: str) -> str:
        s = self.settings
        sampling = {"temperature": s.temperature, "max_tokens": s.max_tokens, "frequency_penalty": s.frequency_penalty}
        output = {"structured_output": s.structured_output, "analysis_max_chars": s.analysis_max_chars}
        return judgment_key({"model": s.model, "prompt": prompt, "sampling": sampling, "output": output})

    def _usage(self, completion: object) -> Usage:
        """The tokens the backend reported (none reported = 0), priced per 1M tokens."""
        reported = getattr(completion, "usage", None)
        prompt_tokens = getattr(reported, "prompt_tokens", 0) or 0
        completion_tokens = getattr(reported, "completion_tokens", 0) or 0
        s = self.settings
        return Usage.priced(prompt_tokens, completion_tokens, s.prompt_price_per_1m, s.completion_price_per_1m)


def _answer_text(completion: object) -> tuple[str | None, str | None]:
    """Content and finish reason of the first choice; (None, None) for a malformed answer."""
    try:
        choice = completion.choices[0]
        return choice.message.content, choice.finish_reason
    except (AttributeError, IndexError, TypeError):
        return None, None
