"""`grace bench reward`: the service's scoring path vs the script a user would write today.

Workload (one run, one model set): ``queries`` x m responses, summaries of
~100 tokens, documents from ~300 tokens to beyond the 2048-token window, cut
from the project's corpora. Both paths load their models before the clock
starts and score the same responses.

- service: ``Scorer`` (bf16 where the CPU has native bf16, length-sorted
  token-budget batches, sliding windows, scored positions only through the
  LM head, one encoder pass per unique text);
- naive: Hugging Face ``evaluate``'s perplexity recipe per model in fp32
  (whole dataset padded to the longest text, truncated to the window, full
  logits), FlagEmbedding ``compute_score`` over every (query, summary) and
  (query, document) pair, then the paper's plain weighted sums. It
  truncates documents beyond the window, so it does less work than the
  service, which scores every token.

Timing: service, naive, service again (the service's time is the mean of
its two runs); everything, the matmul bound included, with the same torch
thread count.

matmul_bound_fraction = model FLOPs of the service's forward passes (real
tokens, no padding) / its elapsed time / torch matmul FLOP/s measured in this
run in the dtype it used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.reward import metrics as M
from services.reward.options import RewardBenchOptions
from shared.bench_report import save_figure, write_json, write_markdown
from shared.calibration import calibrate
from shared.jsonl import read_queries
from shared.parsing import extract_structured
from shared.schemas import Metrics
from shared.throughput import matmul_flops_per_s

log = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parents[2] / "data"


# --------------------------------------------------------------------------- workload


def _corpus_tokens(tokenizer) -> list[int]:
    texts = []
    for name in ("domain_corpus.txt", "general_corpus.txt"):
        path = DATA / name
        if path.exists():
            texts.append(path.read_text(encoding="utf-8"))
    if not texts:
        raise FileNotFoundError(f"no corpus under {DATA}")
    return tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]


def _queries(n: int) -> list[str]:
    rows = []
    for name in ("test_queries.jsonl", "seed_queries.jsonl"):
        path = DATA / name
        if path.exists():
            rows += [row["query"] for row in read_queries(path)]
    if not rows:
        rows = ["Write a report on deepening state-owned enterprise reform."]
    return [rows[i % len(rows)] for i in range(n)]


def make_workload(tokenizer, queries: int, m: int, min_doc: int, max_doc: int, seed: int) -> list[tuple[str, list[str]]]:
    """(query, m structured responses); document lengths spread evenly over [min_doc, max_doc] tokens."""
    rnd = random.Random(seed)
    pool = _corpus_tokens(tokenizer)
    pool = pool * math.ceil((max_doc + 200) * 2 / len(pool))

    def cut(n: int) -> str:
        start = rnd.randrange(0, len(pool) - n)
        return tokenizer.decode(pool[start : start + n]).replace("<", "")

    n_docs = queries * m
    lengths = [round(min_doc + (max_doc - min_doc) * i / max(n_docs - 1, 1)) for i in range(n_docs)]
    rnd.shuffle(lengths)
    groups = []
    for q, query in enumerate(_queries(queries)):
        responses = []
        for j in range(m):
            summary, outline = cut(rnd.randint(80, 120)), cut(rnd.randint(30, 60))
            document = cut(lengths[q * m + j])
            responses.append(f"<summary>{summary}</summary>\n<outline>{outline}</outline>\n<answer>{document}</answer>")
        groups.append((query, responses))
    return groups


# --------------------------------------------------------------------------- naive path


def evaluate_style_perplexity(
    model, tokenizer, texts: list[str], prefix_id: int, max_length: int, batch_size: int
) -> list[float]:
    """Hugging Face evaluate's `perplexity` metric: one padding for the whole dataset, truncation, full logits."""
    encodings = tokenizer(
        texts, add_special_tokens=False, padding=True, truncation=True, max_length=max_length - 1,
        return_tensors="pt", return_attention_mask=True,
    )  # fmt: skip
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")
    ppls: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = encodings["input_ids"][start : start + batch_size]
        mask = encodings["attention_mask"][start : start + batch_size]
        bos = torch.full((batch.size(0), 1), prefix_id, dtype=batch.dtype)
        batch = torch.cat([bos, batch], dim=1)
        mask = torch.cat([torch.ones_like(bos), mask], dim=1)
        with torch.no_grad():
            logits = model(batch, attention_mask=mask).logits
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = batch[..., 1:].contiguous()
        shift_mask = mask[..., 1:].contiguous()
        nll = (loss_fct(shift_logits.transpose(1, 2), shift_labels) * shift_mask).sum(1) / shift_mask.sum(1)
        ppls += torch.exp(nll).tolist()
    return ppls


@dataclass
class NaiveModels:
    tokenizer: object
    general: object
    domain: object
    flag: object
    prefix_id: int
    window: int


def load_naive(models, prefix_id: int, window: int) -> NaiveModels:
    from FlagEmbedding import BGEM3FlagModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.tokenizer))
    tokenizer.padding_side = "right"
    general = AutoModelForCausalLM.from_pretrained(str(models.general), dtype=torch.float32).eval()
    domain = AutoModelForCausalLM.from_pretrained(str(models.domain), dtype=torch.float32).eval()
    flag = BGEM3FlagModel(str(models.embedding), use_fp16=False, devices="cpu")
    return NaiveModels(tokenizer, general, domain, flag, prefix_id, window)


def naive_score(nm: NaiveModels, groups: list[tuple[str, list[str]]], n: int, batch_size: int) -> list[list[Metrics | None]]:
    parts = [[extract_structured(r) for r in responses] for _, responses in groups]
    flat = [(g, i, p) for g, ps in enumerate(parts) for i, p in enumerate(ps) if p is not None]
    docs = [p.answer for _, _, p in flat]
    ppl_g = evaluate_style_perplexity(nm.general, nm.tokenizer, docs, nm.prefix_id, nm.window, batch_size)
    ppl_d = evaluate_style_perplexity(nm.domain, nm.tokenizer, docs, nm.prefix_id, nm.window, batch_size)
    scores = {}
    for key, passages, weights in (("s", [p.summary for _, _, p in flat], M.SUMMARY_WEIGHTS), ("d", docs, M.DOCUMENT_WEIGHTS)):
        pairs = [(groups[g][0], text) for (g, _, _), text in zip(flat, passages)]
        out = nm.flag.compute_score(pairs, max_passage_length=8192, weights_for_different_modes=list(weights))
        scores[key] = [
            weights[0] * d + weights[1] * s + weights[2] * c for d, s, c in zip(out["dense"], out["sparse"], out["colbert"])
        ]
    result: list[list[Metrics | None]] = [[None] * len(ps) for ps in parts]
    for k, (g, i, p) in enumerate(flat):
        tokens = nm.tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        result[g][i] = Metrics(
            length=len(tokens), diversity=M.diversity(tokens, n), professionalism=ppl_g[k] - ppl_d[k],
            general_perplexity=ppl_g[k], domain_perplexity=ppl_d[k],
            relevance_summary=scores["s"][k], relevance_document=scores["d"][k],
        )  # fmt: skip
    return result


# --------------------------------------------------------------------------- measurements


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def compare(service: list[list[Metrics | None]], naive: list[list[Metrics | None]], window: int) -> dict:
    """Agreement of the service's metrics with the naive fp32 script's (documents inside the window only for PPL)."""
    ppl_err, rel_err = [], []
    cal_s = [r for g in calibrate(service) for r in g]
    cal_n = [r for g in calibrate(naive) for r in g]
    for a, b in zip((m for g in service for m in g), (m for g in naive for m in g)):
        if a is None or b is None:
            continue
        if a.length < window - 1:
            ppl_err += [abs(a.general_perplexity / b.general_perplexity - 1), abs(a.domain_perplexity / b.domain_perplexity - 1)]
        rel_err += [abs(a.relevance_summary - b.relevance_summary), abs(a.relevance_document - b.relevance_document)]
    same_sign = [x.desirable == y.desirable for x, y in zip(cal_s, cal_n)]
    return {
        "ppl_max_rel_err_in_window": max(ppl_err, default=0.0),
        "relevance_max_abs_err": max(rel_err, default=0.0),
        "label_agreement": sum(same_sign) / max(len(same_sign), 1),
    }


def run_bench(opts: RewardBenchOptions) -> dict:
    from rich.console import Console
    from rich.table import Table

    from services.reward.config import RewardSettings
    from services.reward.scorer import Scorer
    from shared.tiny_models import ModelSet, ensure_model_set

    queries, responses, preset, seed = opts.queries, opts.responses, opts.preset or "small", opts.seed
    console = Console(stderr=True)
    torch.manual_seed(seed)
    if opts.threads:
        torch.set_num_threads(opts.threads)  # both paths and the matmul bound run with the same threads
    models = ModelSet.at(Path(opts.models).resolve()) if opts.models else ensure_model_set(preset)
    settings = RewardSettings(
        policy_model=str(models.policy), general_model=str(models.general), domain_model=str(models.domain),
        embedding_model=str(models.embedding), worker=False, dtype=opts.dtype,
    )  # fmt: skip
    with console.status("loading models"):
        scorer = Scorer(settings)
        naive = load_naive(models, scorer.prefix_id, scorer.window)
    groups = make_workload(scorer.tokenizer, queries, responses, 300, opts.max_doc_tokens, seed)
    doc_tokens = [
        len(scorer.tokenizer(extract_structured(r).answer, add_special_tokens=False)["input_ids"]) for _, rs in groups for r in rs
    ]
    warm_up = [(groups[0][0], groups[0][1][:1])]  # both paths: allocator, kernels, lazy init
    scorer.score(warm_up)
    naive_score(naive, warm_up, settings.ngram_n, opts.naive_batch)
    config = scorer.general.model.config
    shape = (4096, config.hidden_size, config.intermediate_size)  # the models' own biggest matmul
    bound_before = matmul_flops_per_s(scorer.dtype, shape)

    load_before = os.getloadavg()[0]
    label = f"service path ({len(doc_tokens)} responses, {str(scorer.dtype).removeprefix('torch.')})"

    def service_path():
        scored, stats = scorer.score_with_stats(groups)
        calibrate(scored)
        return scored, stats

    def naive_path():
        scored = naive_score(naive, groups, settings.ngram_n, opts.naive_batch)
        calibrate(scored)
        return scored

    # service, naive, service: the service's time is the mean of the runs around the naive one,
    # so a change in the machine's load during the run does not favour either side
    with console.status(label):
        (service_metrics, stats), first_s = _timed(service_path)
    with console.status("naive script (fp32, evaluate-style perplexity + FlagEmbedding compute_score)"):
        naive_metrics, naive_s = _timed(naive_path)
    with console.status(label + ", again"):
        _, second_s = _timed(service_path)
    service_s = (first_s + second_s) / 2
    bound_after = matmul_flops_per_s(scorer.dtype, shape)
    peak_service = statistics.mean([bound_before, bound_after])
    peak_fp32 = matmul_flops_per_s(torch.float32, shape)
    square_peak = matmul_flops_per_s(scorer.dtype, (2048, 2048, 2048))

    n = len(doc_tokens)
    fraction = stats.flops / service_s / peak_service
    result = {
        "models": str(models.root),
        "responses": n,
        "queries": queries,
        "m": responses,
        "doc_tokens_min": min(doc_tokens),
        "doc_tokens_max": max(doc_tokens),
        "doc_tokens_mean": round(sum(doc_tokens) / n, 1),
        "docs_beyond_window": sum(t >= scorer.window for t in doc_tokens),  # the naive script truncates these
        "window": scorer.window,
        "stride": scorer.stride,
        "dtype": str(scorer.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other work on the machine
        "service_seconds": round(service_s, 3),
        "service_seconds_runs": [round(first_s, 3), round(second_s, 3)],
        "naive_seconds": round(naive_s, 3),
        "service_responses_per_s": round(n / service_s, 3),
        "naive_responses_per_s": round(n / naive_s, 3),
        "speedup": round(naive_s / service_s, 3),
        "model_gflops": round(stats.flops / 1e9, 1),
        "achieved_gflop_s": round(stats.flops / service_s / 1e9, 1),
        "matmul_shape": list(shape),
        "matmul_gflop_s": round(peak_service / 1e9, 1),
        "matmul_gflop_s_before_after": [round(bound_before / 1e9, 1), round(bound_after / 1e9, 1)],
        "matmul_fp32_gflop_s": round(peak_fp32 / 1e9, 1),
        "matmul_2048_square_gflop_s": round(square_peak / 1e9, 1),
        "matmul_bound_fraction": round(fraction, 3),
        "lm_padding_overhead": round(stats.lm_padded_tokens / max(stats.lm_tokens, 1) - 1, 4),
        "encoder_padding_overhead": round(stats.encoder_padded_tokens / max(stats.encoder_tokens, 1) - 1, 4),
        **{k: round(v, 5) for k, v in compare(service_metrics, naive_metrics, scorer.window).items()},
    }

    table = Table(title=f"reward scoring: {n} responses ({queries} queries x m={responses}), preset {preset}")
    table.add_column("path")
    table.add_column("seconds", justify="right")
    table.add_column("responses/s", justify="right")
    table.add_column("notes")
    table.add_row("service", f"{service_s:.2f}", f"{n / service_s:.2f}",
                  f"{result['dtype']}, {result['achieved_gflop_s']} GFLOP/s = {fraction:.0%} of matmul bound")  # fmt: skip
    table.add_row("naive script", f"{naive_s:.2f}", f"{n / naive_s:.2f}", "fp32, evaluate-style padded PPL, compute_score")
    table.add_row("speedup", f"{result['speedup']:.2f}x", "", "")
    console.print(table)
    _write(opts.out_dir, result)
    print(json.dumps(result))
    return result


def _write(out_dir: Path | None, result: dict) -> None:
    out_dir = out_dir or Path("runs") / f"bench-reward-{time.strftime('%Y%m%d-%H%M%S')}"
    write_json(out_dir / "bench_reward.json", result)
    write_markdown(out_dir / "bench_reward.md", ["figure", "value"], list(result.items()))

    def draw(ax) -> None:
        ax.bar(["service", "naive"], [result["service_responses_per_s"], result["naive_responses_per_s"]], color=["C0", "C7"])
        ax.set_ylabel("responses / s")
        ax.set_title(f"reward scoring, speedup {result['speedup']}x")

    save_figure(out_dir / "bench_reward.png", draw, figsize=(5, 3))


if __name__ == "__main__":
    import typer

    from services.reward.cli import bench

    typer.run(bench)
