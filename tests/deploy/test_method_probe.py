"""scripts/method_probe.py: its report against ranks and p-values worked out by hand, and one real cell on the
tiny models (sample, score, calibrate, train, evaluate in one process)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("L", "E", "P", "Rs", "Rd")


def _row(variant, seed, round_, query, level):
    return {"variant": variant, "seed": seed, "round": round_, "query": query, "parsed": 1.0, **dict.fromkeys(METRICS, level)}


def test_report_ranks_and_pairs_as_computed_by_hand(tmp_path):
    # every metric: grace (3) > kto (2) > the SFT policy (1) on each of 2 seeds x 2 queries
    rows = [_row(v, s, 0, q, 1.0) for v in ("grace", "kto") for s in (0, 1) for q in (0, 1)]
    rows += [_row(v, s, 1, q, level) for v, level in (("grace", 3.0), ("kto", 2.0)) for s in (0, 1) for q in (0, 1)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, "scripts/method_probe.py", "--report", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "| grace | 3.0 ± 0.0 | 3.00 ± 0.00 | 3 ± 0 | 3.000 ± 0.000 | 3.000 ± 0.000 | 1.000 ± 0.000 |" in lines
    # avg ranks 3 / 2 / 1; per unit grace - kto = 1 - 2 and grace - sft = 1 - 3 on all 4 units: exact sign-flip
    # p = 2 of the 16 sign patterns reach |mean| >= 1 (resp. 2)
    assert "| default | 3.0 / 2.0 / 1.0 | -1.000 (0.125) | -2.000 (0.125) |" in lines


def test_one_cell_runs_the_round_on_the_tiny_models(tiny_models, tmp_path):
    command = [sys.executable, "scripts/method_probe.py", "--policy", str(tiny_models.policy), "--variants", "kto",
               "--seeds", "1", "--rounds", "1", "-k", "2", "-m", "2", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert sorted({(r["round"], r["query"]) for r in rows}) == [(rnd, q) for rnd in (0, 1) for q in range(24)]
    assert {r["variant"] for r in rows} == {"kto"} and all(0 <= r["parsed"] <= 1 for r in rows)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["variants"]["kto"]) == {"round0", "round1"} and summary["variants"]["kto"]["round1"]["seeds"] == 1
