"""The rollout worker: one iteration = K new queries (3.2) x m sampled responses (3.3) -> Redis.

1. *Plan*: K queries for the iteration, fixed once in Redis (so a restart
   samples the same ones): generated from 5 uniformly sampled seed queries per
   prompt, deduplicated against every earlier query of the run; when the
   bounded number of generation prompts yields fewer than K (a small or random
   model produces junk), unused seed queries fill the rest, flagged
   ``query_source="seed_fallback"``. The offline mode is one round whose K is
   the whole query set, generated the same way (``query_source="offline"``).
   A planned query equal to a held-out query (``heldout_queries``, after
   whitespace and case are normalised) is dropped and logged
   (``event=heldout_query_dropped``): evaluation queries are never trained on.
2. *Sample*: one chat request with ``n = m`` per query (vLLM batches the m
   samples and shares the prompt's KV cache), ``concurrency`` queries at once.
   ``max_tokens`` is unset by default, so vLLM gives each request the served
   window minus its prompt; each response's ``finish_reason`` travels with it
   (``length`` = truncated).
3. *Publish*: each ``RolloutGroup`` together with its "published" mark in one
   Redis transaction; groups already marked are skipped on a restart; then
   ``IterationComplete(stage="rollout")`` once.

Redis keys (per run): ``grace:rollout:<run>:seen`` (normalized queries),
``...:plan:<it>`` (JSON), ``...:published:<it>`` (group ids), ``...:complete:<it>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import redis

from services.orchestrator.queries import (
    PlannedQuery,
    accept_queries,
    drop_heldout,
    fallback_queries,
    group_id,
    group_seed,
)
from services.orchestrator.rope_check import check_run_rope
from services.rollout.config import RolloutSettings
from shared.parsing import extract_structured, normalize_query, parse_query_list
from shared.prompts import chat_messages, query_generation_prompt
from shared.queries import SeedQuery, load_queries, prompt_lang, sample_examples
from shared.runs import load_run_config
from shared.schemas import FINISH_TRUNCATED, STREAM_ROLLOUTS, IterationComplete, QuerySource, RolloutGroup, encode_message
from shared.streams import as_text

log = logging.getLogger(__name__)


@dataclass
class IterationResult:
    run_id: str
    iteration: int
    planned: int
    published: int
    skipped: int
    generated: int
    fallback: int
    offline: int = 0
    heldout_dropped: int = 0
    responses: int = 0
    truncated: int = 0
    adapter_versions: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    parsed_fraction: float = 0.0
    seconds: float = 0.0

    @property
    def truncation_rate(self) -> float:
        """Share of this call's responses cut by the token limit (finish_reason ``length``)."""
        return self.truncated / self.responses if self.responses else 0.0


def query_list_regex(settings: RolloutSettings) -> str:
    """A compact list literal of 1..examples_per_prompt quoted queries (a regex, not a JSON schema:
    schema-guided decoding lets a weak model pad with whitespace until max_tokens)."""
    item = rf'"[^"\\\n]{{{settings.min_query_chars},{settings.max_query_chars}}}"'  # no quote, backslash, newline
    return rf"\[{item}(, {item}){{0,{settings.examples_per_prompt - 1}}}\]"


def gateway_urls(settings: RolloutSettings) -> list[str]:
    """``gateway_url``: one gateway, or several comma-separated (rollout replicas), each without ``/v1``."""
    urls = [u.strip().rstrip("/") for u in (settings.gateway_url or f"http://127.0.0.1:{settings.port}").split(",")]
    return [u[:-3] if u.endswith("/v1") else u for u in urls if u]


class RolloutWorker:
    def __init__(self, settings: RolloutSettings, client: redis.Redis):
        self.settings = settings
        self.redis = client
        self.run_id = settings.run_id
        key = settings.api_key_value() or "none"
        self.gateway_urls = gateway_urls(settings)
        self.gateway_url = self.gateway_urls[0]  # query generation and the current version
        timeout = settings.request_timeout_s
        # one client per replica: groups are spread over them round-robin (OpenRLHF spreads over its vLLM engines)
        self.samplers = [
            openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, timeout=timeout, max_retries=3) for url in self.gateway_urls
        ]
        self.generator = openai.AsyncOpenAI(
            base_url=(settings.generator_base_url or self.gateway_url + "/v1"),
            api_key=settings.generator_api_key or key,
            timeout=timeout,
            max_retries=3,
        )
        self.generator_model = settings.generator_model  # None = the model being sampled
        self._api_key = key
        self._heldout_dropped = 0  # generated queries dropped as held-out by the last plan made here

    def policy_model(self, iteration: int) -> str:
        """The model a run's iteration samples from: the base (starting policy) in iteration 0, whatever
        adapter an earlier run on this stack left as ``policy``; then ``policy``, the run's newest adapter."""
        return self.settings.served_model_name if iteration == 0 else self.settings.policy_name

    def _key(self, name: str, iteration: int | None = None) -> str:
        suffix = "" if iteration is None else f":{iteration}"
        return f"grace:rollout:{self.run_id}:{name}{suffix}"

    # ---------------------------------------------------------------- 1. plan

    async def plan(self, iteration: int, k: int, offline: bool) -> list[PlannedQuery]:
        """The iteration's queries, created once and then read back from Redis."""
        stored = self.redis.get(self._key("plan", iteration))
        if stored is not None:
            return [PlannedQuery(**row) for row in json.loads(stored)]
        planned = await self._generate_plan(iteration, k, "offline" if offline else "generated")
        rows = json.dumps([{"query": p.query, "source": p.source} for p in planned], ensure_ascii=False)
        plan_key = self._key("plan", iteration)
        with self.redis.pipeline() as pipe:  # the plan and its "seen" marks together, or not at all
            try:
                pipe.watch(plan_key)
                if pipe.exists(plan_key):
                    raise redis.WatchError
                pipe.multi()
                pipe.set(plan_key, rows)
                if planned:
                    pipe.sadd(self._key("seen"), *[normalize_query(p.query) for p in planned])
                pipe.execute()
            except redis.WatchError:  # another worker fixed the plan first: use theirs
                return await self.plan(iteration, k, offline)
        return planned

    def heldout_keys(self) -> set[str]:
        """Normalized held-out queries: read only to keep them out of training (evaluation draws from the file)."""
        path = Path(self.settings.heldout_queries)
        return {normalize_query(q.query) for q in load_queries(path)} if path.exists() else set()

    async def _generate_plan(self, iteration: int, k: int, source: QuerySource) -> list[PlannedQuery]:
        settings = self.settings
        seeds = load_queries(settings.seed_queries)
        rng = random.Random(f"{self.run_id}:{iteration}:{settings.seed}")
        heldout = self.heldout_keys()
        seen = {as_text(m) for m in self.redis.smembers(self._key("seen"))} | heldout
        blocked = seen | {normalize_query(s.query) for s in seeds}  # generated queries must be new, not seeds
        generated: list[str] = []
        attempts_left = settings.generation_attempts or 3 * k
        attempts = 0
        while len(generated) < k and attempts_left > 0:
            wave = min(settings.concurrency, attempts_left, k - len(generated))
            attempts_left -= wave
            attempts += wave
            prompts = [sample_examples(seeds, rng, settings.examples_per_prompt) for _ in range(wave)]
            answers = await asyncio.gather(*(self._ask_generator(examples, iteration) for examples in prompts))
            for answer in answers:
                candidates, dropped = drop_heldout(parse_query_list(answer), heldout)
                for query in dropped:
                    log.warning("event=heldout_query_dropped run=%s iteration=%d query=%r", self.run_id, iteration, query[:80])
                self._heldout_dropped += len(dropped)
                new = accept_queries(
                    candidates, blocked, limit=k - len(generated),
                    min_chars=settings.min_query_chars, max_chars=settings.max_query_chars,
                )  # fmt: skip
                generated.extend(new)
        planned = [PlannedQuery(q, source) for q in generated]
        if len(planned) < k:
            log.warning(
                "event=query_generation_short run=%s iteration=%d wanted=%d generated=%d attempts=%d fallback=%s",
                self.run_id, iteration, k, len(planned), attempts, settings.seed_fallback,
            )  # fmt: skip
            if settings.seed_fallback:
                seen.update(normalize_query(q) for q in generated)
                extra = fallback_queries(seeds, seen, k - len(planned), rng)
                planned += [PlannedQuery(q, "seed_fallback") for q in extra]
        log.info(
            "event=queries_planned run=%s iteration=%d generated=%d fallback=%d attempts=%d",
            self.run_id, iteration, len(generated), len(planned) - len(generated), attempts,
        )  # fmt: skip
        return planned

    async def _ask_generator(self, examples: list[SeedQuery], iteration: int) -> str:
        settings = self.settings
        prompt = query_generation_prompt([e.query for e in examples], prompt_lang(examples, settings.query_lang))
        extra = {}
        if settings.generation_json_list:  # a JSON list of strings is also the Python list the prompt asks for
            extra["structured_outputs"] = {"regex": query_list_regex(settings)}
        try:
            reply = await self.generator.chat.completions.create(
                model=self.generator_model or self.policy_model(iteration),
                messages=[{"role": "user", "content": prompt}],
                temperature=settings.generation_temperature,
                top_p=settings.top_p,
                max_tokens=settings.generation_max_tokens,
                extra_body=extra or None,
            )
        except openai.APIError as exc:
            log.warning("event=query_generation_failed error=%s", type(exc).__name__)
            return ""
        return reply.choices[0].message.content or ""

    # ---------------------------------------------------------------- 2. sample

    async def sample(
        self, query: str, m: int, seed: int | None, model: str | None = None, replica: int = 0
    ) -> tuple[list[str], list[str | None], str | None, int]:
        """m responses to one query in one request to gateway ``replica`` (modulo their number);
        (responses, finish reasons, adapter version, completion tokens)."""
        settings = self.settings
        sampler = self.samplers[replica % len(self.samplers)]
        raw = await sampler.chat.completions.with_raw_response.create(
            model=model or settings.policy_name,
            messages=chat_messages(query),
            n=m,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_tokens,
            seed=seed,
        )
        completion = raw.parse()
        choices = sorted(completion.choices, key=lambda c: c.index)
        tokens = completion.usage.completion_tokens if completion.usage else 0
        texts = [c.message.content or "" for c in choices]
        return texts, [c.finish_reason for c in choices], raw.headers.get("x-grace-adapter-version"), tokens

    async def current_version(self) -> str:
        """The gateway's current adapter version (``base`` before the first swap, or if not a gateway)."""
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                reply = await client.get(
                    self.gateway_url + "/admin/adapters", headers={"authorization": f"Bearer {self._api_key}"}
                )
            if reply.status_code == 200:
                return reply.json()["current"]["version"]
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        return "base"

    # ---------------------------------------------------------------- 3. publish

    async def run_iteration(
        self, iteration: int, *, k: int | None = None, m: int | None = None, offline: bool | None = None
    ) -> IterationResult:
        started = time.perf_counter()
        run_config = load_run_config(self.redis, self.run_id)
        if run_config is not None and run_config.seed is not None:  # the run's seed: plan rng and group seeds
            self.settings = self.settings.model_copy(update={"seed": run_config.seed})
        for url in self.gateway_urls:
            await check_run_rope(url, self._api_key, run_config, fallback=self.settings.rope())
        k = k or (run_config.queries_in(iteration) if run_config else self.settings.queries_per_iteration)
        m = m or (run_config.responses_per_query if run_config else self.settings.responses_per_query)
        offline = offline if offline is not None else (run_config.offline if run_config else False)
        model = self.policy_model(iteration)
        version = await self.current_version() if model == self.settings.policy_name else "base"
        log.info("event=rollout_iteration_start run=%s iteration=%d k=%d m=%d offline=%s adapter=%s",
                 self.run_id, iteration, k, m, offline, version)  # fmt: skip

        self._heldout_dropped = 0
        planned = await self.plan(iteration, k, offline)
        published_key = self._key("published", iteration)
        done = {as_text(g) for g in self.redis.smembers(published_key)}
        todo = [(i, p) for i, p in enumerate(planned) if group_id(self.run_id, iteration, i) not in done]
        result = IterationResult(
            run_id=self.run_id, iteration=iteration, planned=len(planned), published=0, skipped=len(planned) - len(todo),
            generated=sum(p.source == "generated" for p in planned), fallback=sum(p.source == "seed_fallback" for p in planned),
            offline=sum(p.source == "offline" for p in planned), heldout_dropped=self._heldout_dropped,
        )  # fmt: skip
        gate = asyncio.Semaphore(self.settings.concurrency)
        parsed = total = 0

        async def one(index: int, item: PlannedQuery) -> None:
            nonlocal parsed, total
            async with gate:
                seed = group_seed(self.settings.seed, iteration, index)
                responses, finish, served, tokens = await self.sample(item.query, m, seed, model, replica=index)
            gid = group_id(self.run_id, iteration, index)
            group = RolloutGroup(
                run_id=self.run_id, iteration=iteration, group_id=gid, group_index=index, query=item.query,
                responses=responses, adapter_version=served or version, query_source=item.source, finish_reasons=finish,
            )  # fmt: skip
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(STREAM_ROLLOUTS, encode_message(group))
            pipe.sadd(published_key, gid)
            pipe.execute()
            result.published += 1
            result.completion_tokens += tokens
            parsed += sum(extract_structured(r) is not None for r in responses)
            total += len(responses)
            result.truncated += sum(f == FINISH_TRUNCATED for f in finish)
            if group.adapter_version not in result.adapter_versions:
                result.adapter_versions.append(group.adapter_version)
            log.info("event=group_published group=%s responses=%d tokens=%d adapter=%s source=%s",
                     gid, len(responses), tokens, group.adapter_version, item.source)  # fmt: skip

        await asyncio.gather(*(one(i, p) for i, p in todo))
        self._complete(iteration, len(planned))
        result.parsed_fraction = parsed / total if total else 0.0
        result.responses = total
        result.seconds = time.perf_counter() - started
        log.info("event=rollout_iteration_done run=%s iteration=%d published=%d skipped=%d tokens=%d parsed=%.2f "
                 "truncated=%d s=%.1f", self.run_id, iteration, result.published, result.skipped,
                 result.completion_tokens, result.parsed_fraction, result.truncated, result.seconds)  # fmt: skip
        return result

    def _complete(self, iteration: int, count: int) -> None:
        """Publishes IterationComplete once per iteration (the flag and the entry in one transaction)."""
        flag = self._key("complete", iteration)
        if self.redis.exists(flag):
            return
        pipe = self.redis.pipeline(transaction=True)
        done = IterationComplete(run_id=self.run_id, iteration=iteration, stage="rollout", count=count)
        pipe.xadd(STREAM_ROLLOUTS, encode_message(done))
        pipe.set(flag, "1")
        pipe.execute()

    async def aclose(self) -> None:
        for sampler in self.samplers:
            await sampler.close()
        await self.generator.close()


async def run_iteration(settings: RolloutSettings, client: redis.Redis, iteration: int, **kwargs) -> IterationResult:
    worker = RolloutWorker(settings, client)
    try:
        return await worker.run_iteration(iteration, **kwargs)
    finally:
        await worker.aclose()
