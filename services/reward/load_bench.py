"""`grace bench reward --load`: C concurrent clients for T seconds against ``POST /v1/score``.

Each client sends one request after another through ``AsyncRewardClient``, so
a 503 (admission queue full) is retried after its ``Retry-After``. Without
``--url`` the bench starts its own reward service on the tiny models with an
admission of one job and C/2 waiting requests, so 503s happen.

Every request carries a unique marker in its queries, which the service echoes
in ``groups[].query``: an answer is matched to its request by it, and its
results must be exactly the request's responses (indices 0..m-1). ``lost`` =
requests without a matching final answer (errors included), ``duplicated`` =
markers answered more than once, ``mismatched`` = answers that are not their
request's. ``retry_after_honoured`` checks, from each 503's reply time and the
next attempt's send time, that the client waited at least the Retry-After.
After T seconds no new request starts; the ones in flight are awaited.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.reward.options import RewardBenchOptions
from shared.bench_report import save_figure, write_json, write_markdown
from shared.schemas import ScoreResponse
from shared.service_client import AsyncRewardClient

DATA = Path(__file__).resolve().parents[2] / "data"
ROOT = DATA.parent
# Admission of the bench's own service: one job computing, C/2 waiting, the rest told to come back in 1 s.
# (With one waiting place, 8 clients and a fixed Retry-After, a retried request competes with requests sent
# at once by clients just answered, and 30 retries were not always enough: some requests starved.)
SERVICE_LIMITS = {"max_concurrency": 1, "retry_after_s": 1}
BUSY_RETRIES = 120  # per request: a 503 costs a Retry-After wait, never an answer
HONOUR_SLACK_S = 0.05  # clock granularity between the reply's read and the next send


# --------------------------------------------------------------------------- workload


def _texts() -> list[str]:
    path = DATA / "domain_corpus.txt"
    text = path.read_text(encoding="utf-8").replace("<", "") if path.exists() else "State-owned enterprise reform. " * 200
    return [text] if len(text) > 2000 else [text * math.ceil(2000 / max(len(text), 1))]


def make_request(marker: str, groups: int, m: int, rnd: random.Random, corpus: str) -> list[tuple[str, list[str]]]:
    """``groups`` queries carrying ``marker``, m structured responses each (short, varied documents)."""

    def cut(lo: int, hi: int) -> str:
        n = rnd.randint(lo, hi)
        start = rnd.randrange(0, len(corpus) - n)
        return corpus[start : start + n]

    return [
        (
            f"[{marker}/{g}] Write a report on {cut(20, 60)}",
            [
                f"<summary>{cut(80, 160)}</summary>\n<outline>{cut(30, 60)}</outline>\n<answer>{cut(200, 900)}</answer>"
                for _ in range(m)
            ],
        )
        for g in range(groups)
    ]


# --------------------------------------------------------------------------- pure checks


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def check_answers(sent: dict[str, list[tuple[str, int]]], answers: list[tuple[str, ScoreResponse]]) -> dict[str, int]:
    """``sent``: marker -> [(query, m), ...]; ``answers``: (marker, response) as they came back."""
    seen: dict[str, int] = defaultdict(int)
    mismatched = 0
    for marker, response in answers:
        seen[marker] += 1
        expected = sent.get(marker)
        got = [(g.query, [r.index for r in g.results]) for g in response.groups]
        if expected is None or got != [(query, list(range(m))) for query, m in expected]:
            mismatched += 1
    return {
        "lost": sum(1 for marker in sent if seen.get(marker, 0) == 0),
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "mismatched": mismatched,
    }


def min_wait_after_busy(timeline: dict[str, list[tuple[float, float, int, float | None]]]) -> float | None:
    """Per request, replies as (sent_at, replied_at, status, retry_after): the least (next send - 503 reply
    - Retry-After) over every retried 503; >= 0 means every Retry-After was honoured."""
    margins = []
    for replies in timeline.values():
        ordered = sorted(replies)
        for (_, replied, status, after), (next_sent, *_) in zip(ordered, ordered[1:]):
            if status == 503:
                margins.append(next_sent - replied - (after or 0.0))
    return min(margins, default=None)


# --------------------------------------------------------------------------- the run


@dataclass
class LoadRun:
    sent: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    answers: list[tuple[str, ScoreResponse]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # end to end, Retry-After waits included
    service_latencies: list[float] = field(default_factory=list)  # the 200 attempt alone
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    retry_after_values: set[float] = field(default_factory=set)
    timeline: dict[str, list[tuple[float, float, int, float | None]]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)

    def on_reply(self, reply: httpx.Response) -> None:
        replied = time.monotonic()
        marker = json.loads(reply.request.content)["groups"][0]["query"][1:].split("/")[0]
        after = float(reply.headers["Retry-After"]) if "Retry-After" in reply.headers else None
        self.statuses[reply.status_code] += 1
        if reply.status_code == 503 and after is not None:
            self.retry_after_values.add(after)
        if reply.status_code == 200:
            self.service_latencies.append(reply.elapsed.total_seconds())
        self.timeline[marker].append((replied - reply.elapsed.total_seconds(), replied, reply.status_code, after))


async def drive(
    url: str, api_key: str | None, clients: int, seconds: float, groups: int, m: int, seed: int
) -> tuple[LoadRun, float]:
    run = LoadRun()
    corpus = _texts()[0]
    started = time.monotonic()
    deadline = started + seconds

    async def one_client(c: int, client: AsyncRewardClient) -> None:
        rnd = random.Random(seed * 1000 + c)
        n = 0
        while time.monotonic() < deadline:
            marker = f"load-{c}-{n}"
            n += 1
            request = make_request(marker, groups, m, rnd, corpus)
            run.sent[marker] = [(query, len(responses)) for query, responses in request]
            t0 = time.monotonic()
            try:
                response = await client.score(request)
            except Exception as exc:  # counted as lost and reported; the other clients go on
                run.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            run.latencies.append(time.monotonic() - t0)
            run.answers.append((marker, response))

    async with AsyncRewardClient(
        url, api_key, on_reply=run.on_reply, max_connections=clients, busy_retries=BUSY_RETRIES, timeout=300.0
    ) as client:
        await asyncio.gather(*(one_client(c, client) for c in range(clients)))
    return run, time.monotonic() - started


def summarize(run: LoadRun, elapsed: float, clients: int, seconds: float, groups: int, m: int, url: str | None) -> dict:
    answered = len(run.answers)
    scored = sum(len(g.results) for _, r in run.answers for g in r.groups)
    checks = check_answers(run.sent, run.answers)
    margin = min_wait_after_busy(run.timeline)
    busy = run.statuses.get(503, 0)
    busy_given_up = sum("503" in e for e in run.errors)

    def rounded(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "url": url or "own service (tiny models)",
        "clients": clients,
        "seconds": seconds,
        "elapsed_s": round(elapsed, 3),
        "groups_per_request": groups,
        "responses_per_group": m,
        "requests_sent": len(run.sent),
        "requests_answered": answered,
        "responses_scored": scored,
        "requests_per_s": round(answered / elapsed, 3),
        "responses_per_s": round(scored / elapsed, 3),
        "latency_p50_s": rounded(percentile(run.latencies, 50)),
        "latency_p99_s": rounded(percentile(run.latencies, 99)),
        "service_latency_p50_s": rounded(percentile(run.service_latencies, 50)),
        "service_latency_p99_s": rounded(percentile(run.service_latencies, 99)),
        "attempts": sum(run.statuses.values()),
        "status_counts": {str(k): v for k, v in sorted(run.statuses.items())},
        "busy_503": busy,
        "busy_503_retried": busy - busy_given_up,
        "retry_after_s": sorted(run.retry_after_values),
        "min_wait_beyond_retry_after_s": rounded(margin),
        "retry_after_honoured": margin is None or margin >= -HONOUR_SLACK_S,
        "errors": len(run.errors),
        "first_error": run.errors[0] if run.errors else None,
        **checks,
    }


def _own_service(preset: str, dtype: str, threads: int | None, log_path: Path, api_key: str, max_queue: int):
    from shared.local_redis import free_port
    from shared.process import ServiceProcess
    from shared.tiny_models import ensure_model_set

    models = ensure_model_set(preset)
    port = free_port()
    env = {
        "GRACE_REWARD_POLICY_MODEL": str(models.policy),
        "GRACE_REWARD_GENERAL_MODEL": str(models.general),
        "GRACE_REWARD_DOMAIN_MODEL": str(models.domain),
        "GRACE_REWARD_EMBEDDING_MODEL": str(models.embedding),
        "GRACE_REWARD_DTYPE": dtype,
        "GRACE_REWARD_API_KEY": api_key,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **({"GRACE_REWARD_THREADS": str(threads)} if threads else {}),
        **{f"GRACE_REWARD_{k.upper()}": str(v) for k, v in {**SERVICE_LIMITS, "max_queue": max_queue}.items()},
    }
    command = [sys.executable, "-m", "shared.cli", "serve", "reward", "--host", "127.0.0.1", "--port", str(port), "--no-worker"]
    health = f"http://127.0.0.1:{port}/ready"
    return ServiceProcess("reward-load", command, log_path, health_url=health, env=env, cwd=ROOT), f"http://127.0.0.1:{port}"


def run_load_bench(opts: RewardBenchOptions) -> dict:
    from rich.console import Console
    from rich.table import Table

    clients, seconds, groups, responses = opts.clients, opts.seconds, opts.queries, opts.responses
    url, api_key = opts.url, opts.api_key if opts.url else None  # --api-key is --url's
    preset, dtype, threads = opts.preset or "tiny", opts.dtype, opts.threads or None
    out_dir = opts.out_dir or Path("runs") / f"bench-reward-load-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    service = None
    if url is None:  # a key of its own: an inherited GRACE_REWARD_API_KEY must not lock the bench out
        api_key = secrets.token_hex(16)
        service, url_used = _own_service(preset, dtype, threads, out_dir / "reward-service.log", api_key, max(1, clients // 2))
        service.start()
    else:
        url_used = url
    try:
        if service is not None:
            with Console(stderr=True).status(f"starting the reward service ({preset} models)"):
                service.wait_healthy(timeout=300)
        run, elapsed = asyncio.run(drive(url_used, api_key, clients, seconds, groups, responses, opts.seed))
    finally:
        if service is not None:
            service.stop()
    result = summarize(run, elapsed, clients, seconds, groups, responses, url)

    rows = [
        ("requests sent / answered", f"{result['requests_sent']} / {result['requests_answered']}"),
        ("throughput", f"{result['requests_per_s']} requests/s, {result['responses_per_s']} responses/s"),
        ("latency p50 / p99 (s)", f"{result['latency_p50_s']} / {result['latency_p99_s']} (Retry-After waits included)"),
        (
            "service latency p50 / p99 (s)",
            f"{result['service_latency_p50_s']} / {result['service_latency_p99_s']} (the 200 attempt)",
        ),
        (
            "503s retried / seen",
            f"{result['busy_503_retried']} / {result['busy_503']}, Retry-After {result['retry_after_s']} s, honoured: {result['retry_after_honoured']}",
        ),
        ("lost / duplicated / mismatched", f"{result['lost']} / {result['duplicated']} / {result['mismatched']}"),
        ("errors", str(result["errors"])),
    ]
    table = Table(
        title=f"reward /v1/score under load: {clients} clients x {seconds:g} s, {groups} x {responses} responses per request"
    )
    table.add_column("figure")
    table.add_column("value")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    write_json(out_dir / "bench_reward_load.json", result)
    write_markdown(out_dir / "bench_reward_load.md", ["figure", "value"], list(result.items()))

    def draw(ax) -> None:
        ax.hist(run.latencies, bins=30, color="C0")
        ax.set_xlabel("request latency, s (Retry-After waits included)")
        ax.set_ylabel("requests")
        ax.set_title(f"{clients} clients: {result['requests_per_s']} req/s, {result['busy_503']} x 503")

    save_figure(out_dir / "bench_reward_load.png", draw)
    print(json.dumps(result), flush=True)
    return result
