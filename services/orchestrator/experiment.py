"""`grace experiment`: the paper's comparison (Tables 1/2, figures 1 and 3) on one stack with one command.

Methods (every one gets the same query budget N, the same m and the same seeds):

- ``sft``: the starting (SFT) policy itself, evaluated, no training (the baseline row);
- ``kto``, ``dpo``, ``orpo``: the semi-online loop with that loss (ceil(N/K) rounds of K queries);
- ``grace_offline``: GRACE-KTO offline, one round of all N queries sampled from the starting policy;
- ``grace``: GRACE-KTO semi-online;
- ``grpo``: GRPO, the online RL baseline (group-relative advantages from the same rewards, semi-online rounds).

Each (method, seed) cell is its own run, id ``<experiment>-<method>-s<seed>``, with ``RunConfig.seed`` =
the seed (query plan, sampling, LoRA init, batch order), so a stopped experiment resumes cell by cell.
The base row (the starting policy on the held-out split, ``eval_n`` samples per query, the evaluation
seed of the seed) is evaluated once per seed: it is the ``sft`` cell and the first point of every
other cell's curve. Each cell's final policy is evaluated the same way.

Outputs in ``<run-root>/<experiment>/``: ``table.md``, ``comparison.md``, ``figure1_zscores.png``,
``figure3_iterations.png``, ``experiment.json``; the command prints the JSON contract as its last line.
With ``--report-to``, every cell is a run of its own in ``<run-root>/<experiment>/tracking/`` (TensorBoard
``tensorboard/<cell>``, one MLflow experiment or W&B group named after the experiment), and a run named
after the experiment holds the method table and the cells' final values.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from rich.console import Console

from services.orchestrator import stats
from services.orchestrator.options import ExperimentOptions
from services.orchestrator.stack import StackInfo
from shared.jsonl import read_jsonl
from shared.tracking import RunRecorder, TrackingOptions, open_tracker

TRAINED = {"kto": ("kto", False), "dpo": ("dpo", False), "orpo": ("orpo", False),
           "grace_offline": ("grace_kto", True), "grace": ("grace_kto", False), "grpo": ("grpo", False)}  # fmt: skip
BASELINE = "sft"
EVAL_SEED_STRIDE = 10007  # evaluation seed of seed s: s * stride (+ query index, + sample index in vLLM)


def cell_id(name: str, method: str, seed: int) -> str:
    return f"{name}-{method}-s{seed}"


def run_experiment(options: ExperimentOptions, info: StackInfo | None = None, console: Console | None = None) -> dict:
    """The whole experiment; returns the JSON contract (also in ``experiment.json``)."""
    console = console or Console()
    started = time.perf_counter()
    out = (Path(options.run_root) / options.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stack = None
    if info is None and options.stack_dir is not None:
        info = StackInfo.load(Path(options.stack_dir) / "stack.json")
    cells = _finished_cells(options, out) if info is None else None  # all done: rewrite the outputs, no stack
    if cells is None:
        if info is None:
            stack, info = _own_stack(options, out, console)
        try:
            cells = _run_cells(options, info, console)
        finally:
            if stack is not None:
                with console.status("stopping the stack"):
                    stack.down()
    contract = write_outputs(options, cells, out)
    track_summary(options, contract, cells, out)
    console.print(f"experiment {options.name}: {len(cells)} cells in {time.perf_counter() - started:.0f}s; "
                  f"table {out / 'table.md'}")  # fmt: skip
    return contract


def _own_stack(options: ExperimentOptions, out: Path, console: Console):
    """The demo's tiny stack (its SFT policy reused from ``sft_dir``), run folders inside ``out``."""
    from services.orchestrator.demo import DEMO_ROPE, sft_policy, tiny_stack_config
    from services.orchestrator.stack import LocalStack
    from shared.tiny_models import ensure_model_set

    models = ensure_model_set("tiny")
    policy = sft_policy(Path(options.sft_dir).resolve(), console, DEMO_ROPE)
    stack = LocalStack(tiny_stack_config(out, policy, models, run_root=out))
    with console.status("starting Redis, rollout (vLLM), reward, trainer, judge"):
        info = stack.up()
    return stack, info


def tracking_options(options: ExperimentOptions) -> TrackingOptions:
    """Every cell tracks into the experiment's own folder, side by side (``<run-root>/<name>/tracking``)."""
    out = (Path(options.run_root) / options.name).resolve()
    return TrackingOptions(report_to=options.report_to, directory=out / "tracking", group=options.name)


def track_summary(options: ExperimentOptions, contract: dict, cells: list[dict], out: Path) -> None:
    """The experiment's own tracked run: the method table (``methods``) and each cell's final values (``cells``)."""
    tracker = open_tracker(tracking_options(options), out, options.name, {k: str(v) for k, v in asdict(options).items()})
    if not tracker:
        return
    try:
        methods = contract["methods"]
        tracker.log_table("methods", [{"method": m, "avg_rank": t["avg_rank"],
                                       **{s: v["mean"] for s, v in t["metrics"].items()}} for m, t in methods.items()])  # fmt: skip
        tracker.log_metrics(0, {f"avg_rank/{m}": t["avg_rank"] for m, t in methods.items()})
        tracker.log_table("cells", [{"method": c["method"], "seed": c["seed"], "run_id": c["run_id"], "final_label": c["final_label"],
                                     **{s: c["final"].get(k) for s, k in stats.METRICS.items()}} for c in cells])  # fmt: skip
    finally:
        tracker.close()


def _cells_root(info: StackInfo) -> Path:
    """Where the stack's trainer writes run folders (samples files): every cell's folder lives there."""
    settings = yaml.safe_load(Path(info.config_path).read_text()) or {}
    return Path((settings.get("common") or {}).get("run_root") or "runs").resolve()


def _finished_cells(options: ExperimentOptions, root: Path) -> list[dict] | None:
    """Every cell of the experiment from its own folder under ``root``, or None while any is unfinished."""
    cells = []
    for seed in range(options.seeds):
        for method in options.methods:
            if method == BASELINE:
                cell = _base_record(options, root, seed)
            else:
                cell = _trained_record(options, root, method, seed, 0.0, resumed=True)
            if cell is None:
                return None
            cells.append(cell)
    return cells


def _base_record(options: ExperimentOptions, root: Path, seed: int) -> dict | None:
    """The base cell's record (its ``cell.json``, written when it was evaluated); None before that."""
    marker = root / cell_id(options.name, BASELINE, seed) / "cell.json"
    return {**json.loads(marker.read_text()), "resumed": True} if marker.exists() else None


def _trained_record(options: ExperimentOptions, root: Path, method: str, seed: int, seconds: float,
                    resumed: bool) -> dict | None:  # fmt: skip
    """A trained cell's record from its run folder; None before its final policy is evaluated."""
    from services.orchestrator.loop import RunState, stage_label

    run_id = cell_id(options.name, method, seed)
    run_dir = root / run_id
    final_label = stage_label(_config(options, method, seed).iterations - 1)
    final = RunState.load(run_dir / "state.json").evaluated.get(final_label)
    if final is None:
        return None
    return {"method": method, "seed": seed, "run_id": run_id, "dir": str(run_dir), "final_label": final_label,
            "final": final, "records": str(run_dir / "eval" / final_label.replace(" ", "-") / "responses.jsonl"),
            "seconds": seconds, "resumed": resumed}  # fmt: skip


def _config(options: ExperimentOptions, method: str, seed: int):
    from shared.runs import RunConfig

    loss, offline = TRAINED[method]
    return RunConfig.from_budget(
        cell_id(options.name, method, seed), total_queries=options.total_queries, k=options.k,
        iterations=options.iterations, offline=offline, responses_per_query=options.m, loss=loss,
        epochs=options.epochs, seed=seed,
    )  # fmt: skip


def _run_cells(options: ExperimentOptions, info: StackInfo, console: Console) -> list[dict]:
    root = _cells_root(info)
    trained = [m for m in options.methods if m in TRAINED]
    total = options.seeds * (len(trained) + 1)
    cells: list[dict] = []
    done = 0
    for seed in range(options.seeds):
        done += 1
        base = _base_cell(options, info, root, seed, console, f"[{done}/{total}]")
        if BASELINE in options.methods:
            cells.append(base)
        for method in trained:
            done += 1
            cells.append(_trained_cell(options, info, root, method, seed, base, console, f"[{done}/{total}]"))
    return cells


def _progress(console: Console, tag: str, cell: dict) -> None:
    values = cell["final"]
    shown = " ".join(f"{s} {values.get(k):.3g}" if values.get(k) is not None else f"{s} -" for s, k in stats.METRICS.items())
    how = "already done" if cell["resumed"] else f"{cell['seconds']:.0f}s"
    console.print(f"{tag} {cell['method']} seed {cell['seed']} ({cell['run_id']}): {how}; "
                  f"final {cell['final_label']}: {shown}, parsed {_pct(values.get('parse_rate'))}", soft_wrap=True)  # fmt: skip


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _base_cell(options: ExperimentOptions, info: StackInfo, root: Path, seed: int, console: Console, tag: str) -> dict:
    """The starting policy on the held-out split (the ``sft`` method and every curve's first point)."""
    from services.orchestrator.evaluation import EvalOptions, PolicySpec, run_eval
    from services.orchestrator.loop import BASE_LABEL
    from services.rollout.config import RolloutSettings
    from shared.settings import load_settings

    cell = _base_record(options, root, seed)
    if cell is not None:
        _progress(console, tag, cell)
        return cell
    run_id = cell_id(options.name, BASELINE, seed)
    run_dir = root / run_id
    started = time.perf_counter()
    settings = load_settings(RolloutSettings, info.config_path, run_id=run_id, gateway_url=info.gateway_urls())
    with console.status(f"{tag} {BASELINE} seed {seed}: evaluating the starting policy"):
        summary = run_eval(
            EvalOptions(
                policies=[PolicySpec(label=BASE_LABEL, model=settings.served_model_name)],
                queries=settings.heldout_queries, limit=options.eval_limit, out_dir=run_dir / "eval" / BASE_LABEL,
                rollout_url=info.urls["rollout"] + "/v1", reward_url=info.urls["reward"], judge=False,
                max_tokens=options.eval_max_tokens, n=options.eval_n, seed=_eval_seed(seed),
            ),
            progress=False,
        )  # fmt: skip
    values = summary["policies"][BASE_LABEL]
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"time": time.time(), "stage": "eval", "label": BASE_LABEL, **values}) + "\n")
    tracker = open_tracker(tracking_options(options), run_dir, run_id, {"method": BASELINE, "seed": seed})
    try:
        RunRecorder(tracker, run_dir).record({"stage": "eval", "label": BASE_LABEL, **values})
    finally:
        tracker.close()
    cell = {"method": BASELINE, "seed": seed, "run_id": run_id, "dir": str(run_dir), "final_label": BASE_LABEL,
            "final": values, "records": str(run_dir / "eval" / BASE_LABEL / "responses.jsonl"),
            "seconds": time.perf_counter() - started}  # fmt: skip
    (run_dir / "cell.json").write_text(json.dumps(cell, indent=1))
    cell["resumed"] = False
    _progress(console, tag, cell)
    return cell


def _eval_seed(seed: int) -> int:
    return seed * EVAL_SEED_STRIDE


def _trained_cell(options: ExperimentOptions, info: StackInfo, root: Path, method: str, seed: int, base: dict,
                  console: Console, tag: str) -> dict:  # fmt: skip
    from services.orchestrator.loop import BASE_LABEL, RunOptions, RunState, SemiOnlineRun, stage_label

    config = _config(options, method, seed)
    run_dir = root / config.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState.load(run_dir / "state.json")
    resumed = stage_label(config.iterations - 1) in state.evaluated
    if BASE_LABEL not in state.evaluated:  # the same starting policy, evaluation and seed: reuse the base row
        state.evaluated[BASE_LABEL] = base["final"]
        state.save()
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), "stage": "eval", "label": BASE_LABEL, "from": base["run_id"],
                                 **base["final"]}) + "\n")  # fmt: skip
    started = time.perf_counter()
    run_options = RunOptions(config=config, run_dir=run_dir, eval_limit=options.eval_limit,
                             eval_max_tokens=options.eval_max_tokens, eval_n=options.eval_n,
                             eval_seed=_eval_seed(seed), stage_timeout_s=options.stage_timeout_s,
                             tracking=tracking_options(options))  # fmt: skip
    status = (f"{tag} {method} seed {seed}: {config.iterations} round(s) of K={config.queries_per_iteration}, "
              f"m={config.responses_per_query}, loss {config.loss}")  # fmt: skip
    with open(run_dir / "console.log", "a", encoding="utf-8") as log_file, console.status(status):
        SemiOnlineRun(run_options, info, Console(file=log_file, width=140)).run()  # the cell's own log
    cell = _trained_record(options, root, method, seed, time.perf_counter() - started, resumed)
    _progress(console, tag, cell)
    return cell


# --------------------------------------------------------------------------- outputs


def write_outputs(options: ExperimentOptions, cells: list[dict], out: Path) -> dict:
    methods = [m for m in options.methods if any(c["method"] == m for c in cells)]
    per_seed = {m: [c["final"] for c in sorted(cells, key=lambda c: c["seed"]) if c["method"] == m] for m in methods}
    table = stats.method_table(per_seed, baseline=BASELINE)
    units = {m: {} for m in methods}
    for c in cells:
        units[c["method"]].update(stats.unit_means(read_jsonl(Path(c["records"])), c["seed"]))
    comparisons = {b: stats.paired_comparison(units, "grace", b) for b in ("kto", BASELINE) if {"grace", b} <= set(methods)}
    comparison = comparisons.get("kto")
    seeds = sorted({c["seed"] for c in cells})
    contract: dict = {
        "seeds": options.seeds,
        "methods": {
            m: {"avg_rank": table[m]["avg_rank"],
                "metrics": {s: {"mean": _num(v["mean"]), "ci95": [_num(v["ci95"][0]), _num(v["ci95"][1])]}
                            for s, v in table[m]["metrics"].items()}}
            for m in methods
        },
    }  # fmt: skip
    if comparison is not None:
        contract["grace_vs_kto"] = {"avg_rank_delta": table["grace"]["avg_rank"] - table["kto"]["avg_rank"],
                                    "p_value": comparison["avg_rank"]["p_value"]}  # fmt: skip
    parsed = {m: [v.get("parse_rate") for v in per_seed[m]] for m in methods}
    (out / "table.md").write_text(table_markdown(options, table, parsed))
    per_seed_ranks = stats.seed_ranks(per_seed)
    if comparisons:
        (out / "comparison.md").write_text(comparison_markdown(options, table, comparisons, seeds, per_seed_ranks))
    _figure1(out / "figure1_zscores.png", methods, table)
    _figure3(out / "figure3_iterations.png", methods, cells)
    record = {"contract": contract, "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
              "table": table, "grace_vs_kto": comparison, "grace_vs_sft": comparisons.get(BASELINE),
              "seed_ranks": dict(zip(seeds, per_seed_ranks)),
              "cells": [{k: v for k, v in c.items() if k != "final"} | {"final": {s: c["final"].get(k) for s, k in stats.METRICS.items()}}
                        for c in cells]}  # fmt: skip
    (out / "experiment.json").write_text(json.dumps(record, indent=1))
    return contract


def _num(value):
    """A float, or None (JSON null) for a metric no seed measured (no parsed response at all)."""
    return None if value is None else float(value)


def _budget(options: ExperimentOptions) -> str:
    n = options.total_queries if options.total_queries is not None else options.k * options.iterations
    return (f"N={n} queries, K={options.k}, m={options.m}, {options.seeds} seed(s), held-out: "
            f"{options.eval_limit or 'all'} queries x {options.eval_n} samples")  # fmt: skip


def table_markdown(options: ExperimentOptions, table: dict, parsed: dict[str, list[float | None]] | None = None) -> str:
    """``parsed``: per method, each seed's share of held-out answers that parse (the metrics' denominators)."""
    methods = list(table)
    head = "| Method | " + " | ".join(stats.METRICS) + " | Avg. Rank |"
    lines = [f"# Experiment {options.name}\n", _budget(options) + "\n",
             "Mean over seeds ± half-width of the 95% t-interval (mean ± t(0.975, S-1)·sd/√S), per-column rank "
             "in brackets (1 = best, higher is better for every metric, ties share the average rank).\n",
             head, "|---" + "|:---:" * (len(stats.METRICS) + 1) + "|"]  # fmt: skip
    for m in methods:
        cells = []
        for s in stats.METRICS:
            v = table[m]["metrics"][s]
            if v["mean"] is None:
                cells.append("- (" + _rank(v["rank"]) + ")")
                continue
            half = (v["ci95"][1] - v["ci95"][0]) / 2
            digits = 1 if s == "L" else 3
            cells.append(f"{v['mean']:.{digits}f} ± {half:.{digits}f} ({_rank(v['rank'])})")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {table[m]['avg_rank']:.2f} |")
    if BASELINE in table and len(methods) > 1:
        lines += ["\n## % gain over the sft baseline (seed means)\n", head.replace(" Avg. Rank |", ""),
                  "|---" + "|:---:" * len(stats.METRICS) + "|"]  # fmt: skip
        for m in methods:
            if m == BASELINE:
                continue
            gains = [table[m]["metrics"][s]["gain_pct"] for s in stats.METRICS]
            lines.append(f"| {m} | " + " | ".join("-" if g is None else f"{g:+.1f}%" for g in gains) + " |")
    if parsed:
        lines += ["\n## Parsed held-out answers (not ranked)\n",
                  "The five metrics are means over the answers that parse (all three tags); a policy that loses the "
                  "format is measured on few answers. Share per seed, in seed order.\n",
                  "| Method | mean | min | per seed |", "|---|:---:|:---:|---|"]  # fmt: skip
        for m, shares in parsed.items():
            known = [x for x in shares if x is not None]
            if known:
                each = " ".join("-" if x is None else f"{x:.0%}" for x in shares)
                lines.append(f"| {m} | {sum(known) / len(known):.0%} | {min(known):.0%} | {each} |")
    return "\n".join(lines) + "\n"


def _rank(rank: float) -> str:
    return f"{rank:.0f}" if rank == int(rank) else f"{rank:.1f}"


def comparison_markdown(options: ExperimentOptions, table: dict, comparisons: dict, seeds: list[int],
                        per_seed_ranks: list[dict[str, float]]) -> str:  # fmt: skip
    """grace against each of kto and sft, paired over (seed, query) units, then every method's rank per seed."""
    lines = [f"# grace vs {' and '.join(comparisons)} ({options.name})\n", _budget(options) + "\n",
             "Paired over units = (seed, held-out query): per unit the metric's mean over the query's parsed "
             "samples, and each method's average rank among all methods on that unit. Mean difference grace - other; "
             "two-sided sign-flip permutation test (exact up to 16 units, else 10,000 random sign patterns). "
             "For the average rank a negative difference favours grace.\n"]  # fmt: skip
    for other, comparison in comparisons.items():
        lines += [
            f"## grace vs {other}\n",
            f"| Metric | units | mean diff (grace - {other}) | p-value |",
            "|---|:---:|:---:|:---:|",
        ]
        for name, v in list(comparison["metrics"].items()) + [("Avg. Rank (per unit)", comparison["avg_rank"])]:
            diff = "-" if v["mean_diff"] is None else f"{v['mean_diff']:+.4g}"
            lines.append(f"| {name} | {v['units']} | {diff} | {v['p_value']:.4f} |")
        delta = table["grace"]["avg_rank"] - table[other]["avg_rank"]
        lines.append(f"\nAverage rank in table.md (seed means): grace {table['grace']['avg_rank']:.2f}, "
                     f"{other} {table[other]['avg_rank']:.2f}, delta {delta:+.2f}.\n")  # fmt: skip
    methods = list(table)
    lines += ["## Average rank per seed\n", "Each seed's final values ranked among the methods on their own "
              "(1 = best).\n", "| seed | " + " | ".join(methods) + " |", "|---" + "|:---:" * len(methods) + "|"]  # fmt: skip
    lines += [f"| {seed} | " + " | ".join(f"{r[m]:.2f}" for m in methods) + " |" for seed, r in zip(seeds, per_seed_ranks)]
    for other in comparisons:
        d = [r["grace"] - r[other] for r in per_seed_ranks]
        lines.append(f"\ngrace vs {other}: ahead on {sum(x < 0 for x in d)} seed(s), level on {sum(x == 0 for x in d)}, "
                     f"behind on {sum(x > 0 for x in d)}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def _figure1(path: Path, methods: list[str], table: dict) -> None:
    from services.orchestrator import report

    values = {m: {report.AUTOMATIC_COLUMNS[i].key: table[m]["metrics"][s]["mean"] for i, s in enumerate(stats.METRICS)}
              for m in methods}  # fmt: skip
    report.plot_zscores(path, methods, report.zscore_matrix(methods, values, report.AUTOMATIC_COLUMNS),
                        style="bars", title="Z-score Normalized Metrics of Different Methods (mean over seeds)")  # fmt: skip


def _figure3(path: Path, methods: list[str], cells: list[dict]) -> None:
    """Per metric, the held-out value per stage (base, iter 1, ...) of each method, mean over seeds,
    from each cell's ``metrics.jsonl`` eval rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, dict[str, list[float]]]] = {}
    for c in cells:
        rows = read_jsonl(Path(c["dir"]) / "metrics.jsonl") if (Path(c["dir"]) / "metrics.jsonl").exists() else []
        stages: dict[int, dict] = {}
        for r in rows:
            if r.get("stage") == "eval":
                index = 0 if r["label"] == "base" else int(r["label"].split()[-1])
                stages[index] = r  # the last row of a stage wins (a resumed cell may repeat one)
        for index, r in stages.items():
            for s, key in stats.METRICS.items():
                if r.get(key) is not None:
                    curves.setdefault(c["method"], {}).setdefault(index, {}).setdefault(s, []).append(float(r[key]))
    fig, axes = plt.subplots(1, len(stats.METRICS), figsize=(3.3 * len(stats.METRICS), 3.4))
    for ax, s in zip(axes, stats.METRICS):
        for m in methods:
            points = sorted((i, sum(v[s]) / len(v[s])) for i, v in curves.get(m, {}).items() if v.get(s))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=m)
        ax.set_title(s)
        ax.set_xlabel("iteration (0 = base)")
    handles: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower right")
    fig.suptitle("Held-out metrics per iteration (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
