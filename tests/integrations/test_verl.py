"""shared.integrations.verl.compute_score called as verl's BatchRewardManager calls it, against the real service.

verl passes ``data_sources`` and ``extra_infos`` as numpy object arrays (``non_tensor_batch``), the decoded
responses and ground truths as lists, all by keyword, plus ``custom_reward_function.reward_kwargs``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import numpy as np
import pytest

from shared.integrations import verl
from shared.integrations.verl import compute_score, prompt_batches
from shared.schemas import METRIC_SYMBOLS
from tests.reward.test_scorer import DOC_OTHER, DOC_SHORT, structured

REPORT, BRIEF, THIRD = "Report on SOE reform", "国企改革简报", "Annual governance review"


def verl_batch(samples: list[tuple[str, str]], key: str = "prompt") -> dict:
    """The keyword arguments BatchRewardManager.verify passes to compute_score."""
    return {
        "data_sources": np.array(["grace"] * len(samples), dtype=object),
        "solution_strs": [response for _, response in samples],
        "ground_truths": [None] * len(samples),
        "extra_infos": np.array([{key: prompt, "index": i} for i, (prompt, _) in enumerate(samples)], dtype=object),
    }


SAMPLES = [
    (REPORT, structured("s1", DOC_SHORT)), (BRIEF, structured("摘要", DOC_OTHER)), (REPORT, structured("s2", DOC_OTHER)),
    (REPORT, "no tags"), (BRIEF, structured("摘要二", DOC_OTHER * 2)), (THIRD, structured("g", DOC_SHORT * 2)),
    (THIRD, structured("h", DOC_OTHER)),
]  # fmt: skip


def test_compute_score_groups_by_prompt_and_returns_what_get_reward_says(reward_service):
    results = compute_score(**verl_batch(SAMPLES), url=reward_service.url, api_key=reward_service.api_key)
    assert len(results) == len(SAMPLES)
    keys = {"score", "weight", *METRIC_SYMBOLS, "parsed", "rank_sum", "zero_variance_group"}
    assert all(set(r) == keys and all(isinstance(v, float) for v in r.values()) for r in results)  # verl logs each key
    body = {"query": [p + r for p, r in SAMPLES], "prompts": [p for p, _ in SAMPLES]}
    answer = httpx.post(f"{reward_service.url}/get_reward", json=body, headers=reward_service.headers, timeout=120).json()
    assert [r["score"] for r in results] == pytest.approx(answer["rewards"])
    assert [r["weight"] for r in results] == pytest.approx(answer["scores"])
    assert [r["L"] for r in results] == answer["extra_logs"]["L"]
    assert results[3]["parsed"] == 0.0 and results[3]["weight"] == -1.0
    # Z per group: mean 0 over each group's parsed responses, higher = better
    for members in ([0, 2], [1, 4], [5, 6]):
        assert sum(results[i]["score"] for i in members) == pytest.approx(0.0, abs=1e-9)
    assert results[0]["score"] != 0.0


def test_groups_split_over_requests_keep_their_z(reward_service, monkeypatch):
    """More prompts than the service's max_groups (3): whole groups per request, the same Z as one request."""
    monkeypatch.setenv("GRACE_REWARD_URL", reward_service.url)  # the URL and key from the environment
    monkeypatch.setenv("GRACE_REWARD_API_KEY", reward_service.api_key)
    whole = compute_score(**verl_batch(SAMPLES, key="question"))
    split = compute_score(**verl_batch(SAMPLES, key="question"), max_groups_per_request=1)
    assert [r["score"] for r in split] == pytest.approx([r["score"] for r in whole])
    weights = compute_score(**verl_batch(SAMPLES), signal="weight")
    assert [r["score"] for r in weights] == pytest.approx([r["weight"] for r in whole])


def test_prompt_batches_never_split_a_group():
    prompts = ["a", "b", "a", "c", "b", "d"]
    assert prompt_batches(prompts, 2) == [[0, 2, 1, 4], [3, 5]]
    assert prompt_batches(prompts, 10) == [[0, 2, 1, 4, 3, 5]]


def test_clear_errors(reward_service, monkeypatch):
    monkeypatch.delenv("GRACE_REWARD_URL", raising=False)
    batch = verl_batch(SAMPLES[:2])
    with pytest.raises(ValueError, match="GRACE_REWARD_URL"):
        compute_score(**batch)
    no_prompt = {**batch, "extra_infos": np.array([{"index": 0}, {"index": 1}], dtype=object)}
    with pytest.raises(ValueError, match=r"extra_infos\[0\] has no non-empty string under 'prompt' or 'question'"):
        compute_score(**no_prompt, url=reward_service.url)
    with pytest.raises(ValueError, match="extra_infos"):
        compute_score(**{**batch, "extra_infos": [None, None]}, url=reward_service.url)  # verl's default: no extra_info
    with pytest.raises(ValueError, match="signal"):
        compute_score(**batch, url=reward_service.url, signal="rank")
    with pytest.raises(RuntimeError, match="401"):
        compute_score(**batch, url=reward_service.url, api_key="wrong")
    too_many = verl_batch([(REPORT, "x")] * 5)  # max_responses 4: the service's 422 message comes through
    with pytest.raises(RuntimeError, match="422.*5 samples share this prompt"):
        compute_score(**too_many, url=reward_service.url, api_key=reward_service.api_key)


def test_verl_can_load_the_file_by_path_alone(reward_service):
    """verl imports ``custom_reward_function.path`` as a standalone module: the file needs nothing of this project."""
    spec = importlib.util.spec_from_file_location("custom_module", Path(verl.__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = Path(verl.__file__).read_text()
    assert "from shared" not in source and "import shared" not in source
    results = module.compute_score(**verl_batch(SAMPLES[:3]), url=reward_service.url, api_key=reward_service.api_key)
    assert len(results) == 3 and "score" in results[0]
