"""`grace score FILE.jsonl`: in-process and through the running API give the same calibrated results."""

import json
import subprocess
import sys

import httpx
import pytest

from tests.fixtures.reward import ROOT, model_env
from tests.reward.test_scorer import DOC_OTHER, DOC_SHORT, structured

GROUPS = [
    {"query": "Report on SOE reform", "responses": [structured("a", DOC_SHORT), "untagged", structured("b", DOC_OTHER)]},
    {"query": "国企改革", "responses": [structured("c", DOC_OTHER * 2), structured("d", DOC_SHORT * 2)]},
    {"query": "Energy policy", "responses": [structured("e", DOC_SHORT + DOC_OTHER)]},
]


@pytest.fixture
def input_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(g, ensure_ascii=False) for g in GROUPS) + "\n", encoding="utf-8")
    return path


def grace_score(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "score", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def assert_same_results(got: list[dict], want: list[dict]) -> None:
    """Equal up to float rounding (batch composition changes the last bits of the model outputs)."""
    assert [g["query"] for g in got] == [g["query"] for g in want]
    for g, w in zip(got, want):
        assert len(g["results"]) == len(w["results"])
        for a, b in zip(g["results"], w["results"]):
            assert (a["index"], a["parsed"]) == (b["index"], b["parsed"])
            for key in ("rank_sum", "z", "weight"):
                assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
            assert (a["metrics"] is None) == (b["metrics"] is None)
            if a["metrics"]:
                assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-4)


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_score_file_through_the_api_matches_one_request(reward_service, input_file, tmp_path):
    import os

    out = tmp_path / "via_api.jsonl"
    env = {**os.environ, "GRACE_REWARD_API_KEY": reward_service.api_key}
    done = grace_score([str(input_file), "--url", reward_service.url, "--out", str(out), "--batch", "1"], env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = read(out)
    assert [line["query"] for line in lines] == [g["query"] for g in GROUPS]
    # calibrated over the whole file although scored one group per request
    one_request = httpx.post(
        f"{reward_service.url}/v1/score", json={"groups": GROUPS}, headers=reward_service.headers, timeout=120
    )
    assert_same_results(lines, one_request.json()["groups"])
    assert lines[0]["results"][1] == {"index": 1, "parsed": False, "metrics": None, "rank_sum": None, "z": None,
                                      "weight": -1.0, "finish_reason": None}  # fmt: skip


def test_score_file_in_process_matches_the_api(reward_service, input_file, tmp_path, tiny_models):
    import os

    out = tmp_path / "local.jsonl"
    done = grace_score(
        [str(input_file), "--out", str(out)], {**os.environ, **model_env(tiny_models), "GRACE_REWARD_DTYPE": "fp32"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    via_api = httpx.post(f"{reward_service.url}/v1/score", json={"groups": GROUPS}, headers=reward_service.headers, timeout=120)
    assert_same_results(read(out), via_api.json()["groups"])


def test_score_rejects_a_bad_line(tmp_path):
    import os

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "responses": "not a list"}\n')
    done = grace_score([str(bad)], dict(os.environ))
    assert done.returncode != 0 and "bad.jsonl:1" in (done.stderr + done.stdout)
