"""`grace eval`: the held-out split through every policy, scored and judged, as the paper's tables.

For each policy (a model name at the rollout service: ``policy``, ``base``, a
versioned adapter; or ``label=model@base_url`` for any OpenAI endpoint):

1. generate responses to the test queries under the structured prompt (3.1);
2. automatic metrics L, E, P, Rs, Rd from the reward service (``POST /v1/score``);
3. the appendix E judgement, through the judge service or the backend directly;

then write into the output folder ``responses.jsonl`` (one ``EvalRecord`` a line), ``summary.json``,
``table_automatic.md`` (Tables 1/4), ``table_judge.md`` (Table 2),
``zscores.png`` (figure 1, or figure 3 with ``stages``) and ``report.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from services.judge.protocol import Judgment, Usage
from services.orchestrator import report
from services.orchestrator.options import EvalOptions, PolicySpec, parse_policy_spec  # noqa: F401 (re-exported)
from shared.jsonl import read_queries, write_jsonl
from shared.parsing import extract_structured
from shared.prompts import chat_messages
from shared.service_client import AsyncRewardClient, AsyncServiceClient

log = logging.getLogger(__name__)

REFERENCE_LABEL = "Labeled Answer"


@dataclass
class EvalRecord:
    """One response of one policy to one query, and what the reward service and the judge made of it.

    A line of ``responses.jsonl`` is its ``asdict``, fields in this order. ``judge`` holds the scores
    (``criteria``, ``analysis``, ``score``) or None: with ``judge_error`` when the judge backend failed, with
    ``judge_parse_error`` when its answers held no scores (a null score, not an error).
    """

    policy: str
    query_id: str
    query: str
    index: int
    response: str
    finish_reason: str | None = None
    completion_tokens: float | None = None
    parsed: bool = False
    metrics: dict | None = None
    metrics_error: str | None = None
    judge: dict | None = None
    judge_error: str | None = None
    error: str | None = None  # generation failed
    judge_parse_error: str | None = None
    judge_usage: dict | None = None  # tokens and cost of the judgment (zero when it came from the cache)
    judge_cached: bool | None = None

    def take_judgment(self, judgment: Judgment) -> None:
        result = judgment.result()
        self.judge = result.model_dump() if result else None
        self.judge_parse_error = judgment.parse_error
        self.judge_usage = judgment.usage.model_dump()
        self.judge_cached = judgment.cached


async def generate(spec: PolicySpec, queries: list[dict], opts: EvalOptions, tick: Callable[[], None]) -> list[EvalRecord]:
    """``n`` responses per query from one policy; a failed request yields empty responses with its error."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=spec.base_url or opts.rollout_url, api_key=opts.rollout_api_key or "EMPTY", timeout=opts.request_timeout_s
    )
    slots = asyncio.Semaphore(opts.concurrency)

    async def one(index: int, row: dict) -> list[EvalRecord]:
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


def _record(
    policy: str, row: dict, k: int, text: str, finish: str | None = None, tokens: float | None = None, error: str | None = None
) -> EvalRecord:
    parsed = extract_structured(text) is not None
    return EvalRecord(policy, row["id"], row["query"], k, text, finish, tokens, parsed, error=error)


async def score(records: list[EvalRecord], opts: EvalOptions, tick: Callable[[int], None]) -> None:
    """Fills ``metrics`` from the reward service, one group per (policy, query).

    A request the service refuses (e.g. a response over its size limit) is
    retried group by group; a group that still fails keeps no metrics and
    records the reason in ``metrics_error``, and the evaluation goes on.
    """
    groups: dict[tuple[str, str], list[EvalRecord]] = {}
    for r in records:
        if r.response:
            groups.setdefault((r.policy, r.query_id), []).append(r)
    keys = list(groups)
    step = opts.reward_groups_per_request

    async def post(http: AsyncRewardClient, chunk: list[tuple[str, str]]) -> None:
        answer = await http.score([(groups[k][0].query, [r.response for r in groups[k]]) for k in chunk])
        for key, group in zip(chunk, answer.groups):
            for result in group.results:
                record = groups[key][result.index]
                record.parsed = result.parsed
                record.metrics = result.metrics.model_dump() if result.metrics else None

    reward = AsyncRewardClient(opts.reward_url, opts.reward_api_key, timeout=opts.request_timeout_s, busy_retries=7)
    async with reward as http:
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
                        record.metrics_error = str(error)[:300]
            tick(len(chunk))


def _judged_text(text: str, part: str) -> str:
    if part == "answer":
        structured = extract_structured(text)
        if structured is not None:
            return structured.answer
    return text


def judge_items(records: list[EvalRecord], opts: EvalOptions, references: Mapping[str, str]) -> list[dict]:
    """``/v1/judge`` bodies, one per record; a reference answer only for a query that has one and a record
    that is not that answer itself."""
    items = []
    for r in records:
        item = {"instruction": r.query, "response": _judged_text(r.response, opts.judge_part)}
        if opts.judge_reference and r.policy != REFERENCE_LABEL and references.get(r.query_id):
            item["reference"] = _judged_text(references[r.query_id], opts.judge_part)
        items.append(item)
    return items


async def judge(
    records: list[EvalRecord], opts: EvalOptions, tick: Callable[[int], None], references: Mapping[str, str] | None = None
) -> None:
    """Fills ``judge`` (criteria, analysis, score), ``judge_parse_error`` or ``judge_error``, and the judgment's
    usage, for every non-empty response. ``references``: query id -> labeled answer (``judge_reference``)."""
    todo = [r for r in records if r.response]
    items = judge_items(todo, opts, references or {})
    if opts.judge_url:
        step = opts.judge_items_per_request
        judge_service = AsyncServiceClient(opts.judge_url, opts.judge_api_key, timeout=opts.request_timeout_s, busy_retries=7)
        async with judge_service as http:
            for start in range(0, len(items), step):
                chunk = items[start : start + step]
                try:
                    answer = await http.post("/v1/judge/batch", {"items": chunk})
                except (RuntimeError, httpx.HTTPError) as exc:  # the whole batch failed: record it, go on
                    log.warning("event=eval_judge_batch_failed items=%d error=%s", len(chunk), str(exc)[:300])
                    answer = {"items": [{"index": i, "error": f"judge service: {str(exc)[:300]}"} for i in range(len(chunk))]}
                for item in answer["items"]:
                    record = todo[start + item["index"]]
                    if item.get("result") is not None:
                        record.take_judgment(Judgment.model_validate(item["result"]))
                    record.judge_error = item.get("error")
                tick(len(chunk))
        return
    from services.judge.client import JudgeBackendError, JudgeClient
    from services.judge.config import JudgeSettings

    client = JudgeClient(JudgeSettings())

    async def one(record: EvalRecord, item: dict) -> None:
        try:
            record.take_judgment(await client.judge(item["instruction"], item["response"], item.get("reference")))
        except JudgeBackendError as exc:
            record.judge_error = str(exc)
        tick(1)

    try:
        await asyncio.gather(*(one(r, item) for r, item in zip(todo, items)))
    finally:
        await client.close()


def _write_records(records: list[EvalRecord], out_dir: Path) -> None:
    write_jsonl(Path(out_dir) / "responses.jsonl", (asdict(r) for r in records))


def judge_usage(records: list[EvalRecord]) -> dict:
    """Judgments, unparsed judgments, cache hits, tokens and cost of a set of records."""
    judged = [r for r in records if r.judge_usage is not None]
    total = sum((Usage.model_validate(r.judge_usage) for r in judged), Usage())
    return {
        "judgments": len(judged),
        "unparsed": sum(1 for r in judged if r.judge_parse_error),
        "cached": sum(1 for r in judged if r.judge_cached),
        **total.model_dump(),
    }


def write_outputs(records: list[EvalRecord], labels: list[str], opts: EvalOptions, unranked: tuple[str, ...] = ()) -> dict:
    """Tables, plot, per-response records and the summary into ``opts.out_dir``; returns the summary."""
    out = Path(opts.out_dir)
    _write_records(records, out)
    values = {}
    for label in labels:
        mine = [r for r in records if r.policy == label]
        values[label] = report.summarize([asdict(r) for r in mine]) | {"judge_usage": judge_usage(mine)}
    summary = {"policies": values, "options": {"queries": str(opts.queries), "limit": opts.limit, "n": opts.n,
               "temperature": opts.temperature, "top_p": opts.top_p, "max_tokens": opts.max_tokens},
               "judge_usage": judge_usage(records)}  # fmt: skip
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
    usage = summary["judge_usage"]
    if usage["judgments"]:
        counts.append(f"\nJudge: {usage['judgments']} judgments ({usage['unparsed']} without scores, {usage['cached']} "
                      f"from the cache), {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion "
                      f"tokens, cost {usage['cost']:.4f}.")  # fmt: skip
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

        async def main() -> list[EvalRecord]:
            records: list[EvalRecord] = []
            for spec in opts.policies:
                task = bar.add_task(f"generate {spec.label}", total=len(queries))
                records += await generate(spec, queries, opts, lambda: bar.advance(task))
            _write_records(records, opts.out_dir)  # a checkpoint: scoring or judging may still fail
            if opts.reference:
                references = [q for q in queries if isinstance(q.get("response"), str) and q["response"].strip()]
                records += [_record(REFERENCE_LABEL, q, 0, q["response"]) for q in references]
            if opts.reward_url:
                groups = len({(r.policy, r.query_id) for r in records if r.response})
                task = bar.add_task("reward metrics", total=groups)
                await score(records, opts, lambda k: bar.advance(task, k))
            if opts.judge:
                task = bar.add_task("judge", total=sum(1 for r in records if r.response))
                labeled = {q["id"]: q["response"] for q in queries if isinstance(q.get("response"), str)}
                await judge(records, opts, lambda k: bar.advance(task, k), labeled)
            return records

        records = asyncio.run(main())
    all_labels = labels + ([REFERENCE_LABEL] if any(r.policy == REFERENCE_LABEL for r in records) else [])
    unranked = (REFERENCE_LABEL,) if REFERENCE_LABEL in all_labels else ()
    summary = write_outputs(records, all_labels, opts, unranked)
    log.info(
        "event=eval_done policies=%d queries=%d responses=%d seconds=%.1f out=%s",
        len(labels), len(queries), len(records), time.perf_counter() - started, opts.out_dir,
    )  # fmt: skip
    return summary
