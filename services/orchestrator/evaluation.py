"""`grace eval`: the held-out split through every policy, scored and judged, as the paper's tables.

For each policy (a model name at the rollout service: ``policy``, ``base``, a
versioned adapter; or ``label=model@base_url`` for any OpenAI endpoint):

1. generate responses to the test queries under the structured prompt (3.1);
2. automatic metrics L, E, P, Rs, Rd from the reward service (``POST /v1/score``);
3. the appendix E judgement, through the judge service or the backend directly;

then write into the output folder ``responses.jsonl``, ``summary.json``,
``table_automatic.md`` (Tables 1/4), ``table_judge.md`` (Table 2),
``zscores.png`` (figure 1, or figure 3 with ``stages``) and ``report.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.judge.client import retry_after_seconds
from services.orchestrator import report
from shared.jsonl import read_queries
from shared.parsing import extract_structured
from shared.prompts import chat_messages

log = logging.getLogger(__name__)

REFERENCE_LABEL = "Labeled Answer"


@dataclass(frozen=True)
class PolicySpec:
    label: str
    model: str
    base_url: str | None = None  # None = the rollout service


def parse_policy_spec(spec: str) -> PolicySpec:
    """``model``, ``label=model``, ``model@http://host/v1`` or ``label=model@http://host/v1``."""
    spec = spec.strip()
    head, at, base_url = spec.partition("@")
    label, _, model = head.rpartition("=")  # the label may hold '=' (the paper's "GRACE (K=250)"), model names don't
    label, model, base_url = label.strip(), model.strip(), base_url.strip()
    if not model or (at and not base_url):
        raise ValueError(f"policy {spec!r}: expected MODEL, LABEL=MODEL or LABEL=MODEL@BASE_URL")
    return PolicySpec(label=label or model, model=model, base_url=base_url or None)


@dataclass
class EvalOptions:
    policies: list[PolicySpec]
    queries: Path = Path("data/test_queries.jsonl")
    limit: int | None = None
    out_dir: Path = Path("runs/default/eval")
    rollout_url: str = "http://127.0.0.1:8000/v1"
    reward_url: str | None = "http://127.0.0.1:8100"
    judge_url: str | None = None  # None = call the judge backend (JudgeSettings) directly
    judge: bool = True
    rollout_api_key: str | None = None  # bearer keys of the project's services
    reward_api_key: str | None = None
    judge_api_key: str | None = None
    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int | None = None  # None = the served window minus the prompt (vLLM's default), as in sampling
    seed: int | None = 0
    concurrency: int = 8
    judge_part: str = "answer"  # "answer": the document when parsed, else the whole text; "full"
    reference: bool = False  # also judge/score the "response" field of the query file, unranked
    stages: bool = False  # policies are training stages: figure 3 lines instead of figure 1 bars
    reward_groups_per_request: int = 4
    judge_items_per_request: int = 16
    request_timeout_s: float = 3600.0


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def generate(spec: PolicySpec, queries: list[dict], opts: EvalOptions, tick: Callable[[], None]) -> list[dict]:
    """``n`` responses per query from one policy; a failed request yields empty responses with its error."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=spec.base_url or opts.rollout_url, api_key=opts.rollout_api_key or "EMPTY", timeout=opts.request_timeout_s
    )
    slots = asyncio.Semaphore(opts.concurrency)

    async def one(index: int, row: dict) -> list[dict]:
        async with slots:
            try:
                completion = await client.chat.completions.create(
                    model=spec.model, messages=chat_messages(row["query"]), n=opts.n, temperature=opts.temperature,
                    top_p=opts.top_p, max_tokens=opts.max_tokens,
                    **({"seed": opts.seed + index} if opts.seed is not None else {}),
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - recorded per query; the other queries go on
                log.warning("event=eval_generation_failed policy=%s query=%s error=%s", spec.label, row["id"], exc)
                tick()
                return [_record(spec.label, row, k, "", error=f"generation failed: {exc}") for k in range(opts.n)]
        tick()
        tokens = completion.usage.completion_tokens / len(completion.choices) if completion.usage else None
        return [
            _record(spec.label, row, k, choice.message.content or "", choice.finish_reason, tokens)
            for k, choice in enumerate(completion.choices)
        ]

    try:
        groups = await asyncio.gather(*(one(i, row) for i, row in enumerate(queries)))
    finally:
        await client.close()
    return [r for group in groups for r in group]


def _record(policy: str, row: dict, k: int, text: str, finish: str | None = None, tokens: float | None = None,
            error: str | None = None) -> dict:  # fmt: skip
    return {
        "policy": policy, "query_id": row["id"], "query": row["query"], "index": k, "response": text,
        "finish_reason": finish, "completion_tokens": tokens, "parsed": extract_structured(text) is not None,
        "metrics": None, "metrics_error": None, "judge": None, "judge_error": None, "error": error,
    }  # fmt: skip


async def score(records: list[dict], opts: EvalOptions, tick: Callable[[int], None]) -> None:
    """Fills ``metrics`` from the reward service, one group per (policy, query).

    A request the service refuses (e.g. a response over its size limit) is
    retried group by group; a group that still fails keeps no metrics and
    records the reason in ``metrics_error``, and the evaluation goes on.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["response"]:
            groups.setdefault((r["policy"], r["query_id"]), []).append(r)
    keys = list(groups)
    step = opts.reward_groups_per_request
    url = f"{opts.reward_url.rstrip('/')}/v1/score"

    async def post(http: httpx.AsyncClient, chunk: list[tuple[str, str]]) -> None:
        body = {"groups": [{"query": groups[k][0]["query"], "responses": [r["response"] for r in groups[k]]} for k in chunk]}
        answer = await _post_with_retry(http, url, body)
        for key, group in zip(chunk, answer["groups"]):
            for result in group["results"]:
                record = groups[key][result["index"]]
                record["parsed"] = bool(result["parsed"])
                record["metrics"] = result.get("metrics")

    async with httpx.AsyncClient(timeout=opts.request_timeout_s, headers=_headers(opts.reward_api_key)) as http:
        for start in range(0, len(keys), step):
            chunk = keys[start : start + step]
            try:
                await post(http, chunk)
            except (RuntimeError, httpx.HTTPError) as exc:
                log.warning("event=eval_score_failed groups=%d error=%s", len(chunk), str(exc)[:300])
                for key in chunk:
                    error: Exception = exc
                    if len(chunk) > 1:
                        try:
                            await post(http, [key])
                            continue
                        except (RuntimeError, httpx.HTTPError) as single:
                            error = single
                    for record in groups[key]:
                        record["metrics_error"] = str(error)[:300]
            tick(len(chunk))


async def _post_with_retry(http: httpx.AsyncClient, url: str, body: dict, attempts: int = 8) -> dict:
    """POST that waits out a busy service (429/503 with Retry-After); other errors raise with the body."""
    for attempt in range(attempts):
        response = await http.post(url, json=body)
        if response.status_code in (429, 503) and attempt < attempts - 1:
            delay = retry_after_seconds(response.headers)
            delay = 2.0 ** min(attempt, 5) if delay is None else min(delay, 300.0)
            log.info("event=eval_service_busy url=%s status=%d delay_s=%.1f", url, response.status_code, delay)
            await asyncio.sleep(delay)
            continue
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
        return response.json()
    raise RuntimeError(f"{url} stayed busy after {attempts} attempts")


def _judged_text(record: dict, part: str) -> str:
    if part == "answer":
        structured = extract_structured(record["response"])
        if structured is not None:
            return structured.answer
    return record["response"]


async def judge(records: list[dict], opts: EvalOptions, tick: Callable[[int], None]) -> None:
    """Fills ``judge`` (criteria, analysis, score) or ``judge_error`` for every non-empty response."""
    todo = [r for r in records if r["response"]]
    items = [{"instruction": r["query"], "response": _judged_text(r, opts.judge_part)} for r in todo]
    if opts.judge_url:
        step = opts.judge_items_per_request
        url = f"{opts.judge_url.rstrip('/')}/v1/judge/batch"
        async with httpx.AsyncClient(timeout=opts.request_timeout_s, headers=_headers(opts.judge_api_key)) as http:
            for start in range(0, len(items), step):
                chunk = items[start : start + step]
                try:
                    answer = await _post_with_retry(http, url, {"items": chunk})
                except (RuntimeError, httpx.HTTPError) as exc:  # the whole batch failed: record it, go on
                    log.warning("event=eval_judge_batch_failed items=%d error=%s", len(chunk), str(exc)[:300])
                    answer = {"items": [{"index": i, "error": f"judge service: {str(exc)[:300]}"} for i in range(len(chunk))]}
                for item in answer["items"]:
                    record = todo[start + item["index"]]
                    record["judge"], record["judge_error"] = item.get("result"), item.get("error")
                tick(len(chunk))
        return
    from services.judge.client import JudgeBackendError, JudgeClient
    from services.judge.config import JudgeSettings

    client = JudgeClient(JudgeSettings())

    async def one(record: dict, item: dict) -> None:
        try:
            record["judge"] = (await client.judge(item["instruction"], item["response"])).model_dump()
        except JudgeBackendError as exc:
            record["judge_error"] = str(exc)
        tick(1)

    try:
        await asyncio.gather(*(one(r, item) for r, item in zip(todo, items)))
    finally:
        await client.close()


def _write_records(records: list[dict], out_dir: Path) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "responses.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_outputs(records: list[dict], labels: list[str], opts: EvalOptions, unranked: tuple[str, ...] = ()) -> dict:
    """Tables, plot, per-response records and the summary into ``opts.out_dir``; returns the summary."""
    out = Path(opts.out_dir)
    _write_records(records, out)
    values = {label: report.summarize([r for r in records if r["policy"] == label]) for label in labels}
    summary = {"policies": values, "options": {"queries": str(opts.queries), "limit": opts.limit, "n": opts.n,
               "temperature": opts.temperature, "top_p": opts.top_p, "max_tokens": opts.max_tokens}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    title = "Training Progress" if opts.stages else "Method"
    automatic = report.rank_table(labels, values, report.AUTOMATIC_COLUMNS, method_title=title, unranked=unranked)
    (out / "table_automatic.md").write_text(automatic)
    sections = ["# Evaluation\n", "## Automatic metrics (Tables 1/4)\n", automatic]
    columns = list(report.AUTOMATIC_COLUMNS)
    if opts.judge:
        judged = report.rank_table(
            labels, values, report.JUDGE_COLUMNS, method_title=title, average_title="Avg.", unranked=unranked
        )
        (out / "table_judge.md").write_text(judged)
        sections += ["\n## LLM-as-a-judge (Table 2)\n", judged]
        columns += report.JUDGE_COLUMNS
    ranked = [label for label in labels if label not in unranked]
    series = report.zscore_matrix(ranked, values, columns)
    report.plot_zscores(
        out / "zscores.png", ranked, series, style="lines" if opts.stages else "bars",
        title="Z-score Normalized Metrics" + (" During Training" if opts.stages else " of Different Methods"),
    )  # fmt: skip
    counts = ["\n## Counts\n",
              "| Method | responses | parsed | metric errors | judged | judge errors | mean completion tokens |",
              "|---|:---:|:---:|:---:|:---:|:---:|:---:|"]  # fmt: skip
    for label in labels:
        v = values[label]
        tokens = "-" if v["completion_tokens"] is None else f"{v['completion_tokens']:.1f}"
        counts.append(f"| {label} | {v['responses']} | {v['parsed']} | {v['metrics_errors']} | {v['judged']} "
                      f"| {v['judge_errors']} | {tokens} |")  # fmt: skip
    sections += counts + ["\n![z-scores](zscores.png)\n"]
    (out / "report.md").write_text("\n".join(sections))
    return summary


def run_eval(opts: EvalOptions, progress: bool = True) -> dict:
    """The whole evaluation; returns the summary (also written to ``opts.out_dir``)."""
    if not opts.policies:
        raise ValueError("no policies to evaluate")
    labels = [p.label for p in opts.policies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"policy labels must differ: {labels}")
    queries = read_queries(opts.queries, opts.limit)
    if not queries:
        raise ValueError(f"no queries in {opts.queries}")
    from rich.progress import Progress

    started = time.perf_counter()
    with Progress(disable=not progress, transient=False) as bar:

        async def main() -> list[dict]:
            records: list[dict] = []
            for spec in opts.policies:
                task = bar.add_task(f"generate {spec.label}", total=len(queries))
                records += await generate(spec, queries, opts, lambda: bar.advance(task))
            _write_records(records, opts.out_dir)  # a checkpoint: scoring or judging may still fail
            if opts.reference:
                references = [q for q in queries if isinstance(q.get("response"), str) and q["response"].strip()]
                records += [_record(REFERENCE_LABEL, q, 0, q["response"]) for q in references]
            if opts.reward_url:
                groups = len({(r["policy"], r["query_id"]) for r in records if r["response"]})
                task = bar.add_task("reward metrics", total=groups)
                await score(records, opts, lambda k: bar.advance(task, k))
            if opts.judge:
                task = bar.add_task("judge", total=sum(1 for r in records if r["response"]))
                await judge(records, opts, lambda k: bar.advance(task, k))
            return records

        records = asyncio.run(main())
    all_labels = labels + ([REFERENCE_LABEL] if any(r["policy"] == REFERENCE_LABEL for r in records) else [])
    unranked = (REFERENCE_LABEL,) if REFERENCE_LABEL in all_labels else ()
    summary = write_outputs(records, all_labels, opts, unranked)
    log.info(
        "event=eval_done policies=%d queries=%d responses=%d seconds=%.1f out=%s",
        len(labels), len(queries), len(records), time.perf_counter() - started, opts.out_dir,
    )  # fmt: skip
    return summary
