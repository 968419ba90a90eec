"""GraceReward, the TRL reward function: grouping and signals, against the real reward service and in a real GRPOTrainer step."""

from __future__ import annotations

import json
import math
import sys

import httpx
import pytest

from shared.integrations.trl import (
    GraceReward,
    GraceRewardError,
    completion_text,
    group_batch,
    metric_means,
    prompt_query,
    resolve_signal,
    signal_value,
)
from shared.local_redis import free_port
from shared.process import ServiceProcess
from shared.prompts import chat_messages
from shared.schemas import Metrics, ResponseResult
from tests.fixtures.reward import API_KEY, ROOT, model_env

SFT = [json.loads(line) for line in (ROOT / "data" / "sft.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
UNPARSED = "a reply with no tags at all"


def sft_groups(n_groups: int, size: int) -> tuple[list[str], list[str]]:
    """TRL-shaped batch: each SFT query repeated ``size`` times, with other SFT responses (all parsed) as its completions."""
    short = sorted(SFT, key=lambda row: len(row["response"]))
    prompts, completions = [], []
    for g in range(n_groups):
        prompts += [short[g]["query"]] * size
        completions += [short[(g * size + k) % len(short)]["response"] for k in range(size)]
    return prompts, completions


def score_directly(service, prompts: list[str], completions: list[str], size: int) -> list[ResponseResult]:
    """What one /v1/score request says about the batch, flattened in completion order."""
    body = {"groups": [{"query": prompts[i], "responses": completions[i : i + size]} for i in range(0, len(prompts), size)]}
    reply = httpx.post(f"{service.url}/v1/score", json=body, headers=service.headers, timeout=300)
    assert reply.status_code == 200, reply.text
    return [ResponseResult.model_validate(r) for group in reply.json()["groups"] for r in group["results"]]


def parsed_metrics(**overrides) -> Metrics:
    values = dict(length=100.0, diversity=50.0, professionalism=1.5, general_perplexity=9.0, domain_perplexity=7.5,
                  relevance_summary=0.4, relevance_document=0.6)  # fmt: skip
    return Metrics(**{**values, **overrides})


# --------------------------------------------------------------------------- pure


def test_signals_accept_the_paper_names_and_the_api_fields():
    assert [resolve_signal(s) for s in ("z", "weight", "rank_sum", "L", "Rd", "PD", "diversity")] == [
        "z", "weight", "rank_sum", "length", "relevance_document", "domain_perplexity", "diversity",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="signal must be one of z, weight, rank_sum, L"):
        resolve_signal("reward")


def test_signal_value_negates_the_rank_sum_and_passes_the_services_nulls():
    parsed = ResponseResult(index=0, parsed=True, metrics=parsed_metrics(), rank_sum=7.5, z=-0.5, weight=-0.8)
    unparsed = ResponseResult(index=1, parsed=False, weight=-1.0)
    assert [signal_value(parsed, s) for s in ("z", "weight", "rank_sum", "length")] == [-0.5, -0.8, -7.5, 100.0]
    assert [signal_value(unparsed, s) for s in ("z", "weight", "rank_sum", "length")] == [None, -1.0, None, None]


def test_text_of_plain_and_conversational_prompts_and_completions():
    conversation = chat_messages("Write a memo on grid storage.")
    assert prompt_query("Write a memo.") == "Write a memo."
    assert prompt_query(conversation) == "Write a memo on grid storage."  # the system prompt is left out
    assert prompt_query([{"role": "system", "content": "A"}, {"role": "system", "content": "B"}]) == "A\n\nB"
    blocks = [{"type": "text", "text": "<summary>s</summary>"}, {"type": "image"}, {"type": "text", "text": "!"}]
    assert completion_text([{"role": "assistant", "content": blocks}]) == "<summary>s</summary>!"
    tool_turns = [
        {"role": "assistant", "content": "call"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "done"},
    ]
    assert completion_text(tool_turns) == "done"
    with pytest.raises(ValueError, match="a completion must be a string or a list of chat messages"):
        completion_text(42)


def test_group_batch_groups_consecutive_completions_and_names_what_is_wrong():
    prompts = ["q1", "q1", "q2", "q2"]
    assert group_batch(prompts, ["a", "b", "c", "d"], 2) == [("q1", ["a", "b"]), ("q2", ["c", "d"])]
    with pytest.raises(ValueError, match="3 completions do not split into groups of num_generations=2"):
        group_batch(prompts[:3], ["a", "b", "c"], 2)
    with pytest.raises(ValueError, match="completions 0..3 should share one prompt.*completion 2 has another"):
        group_batch(prompts, ["a", "b", "c", "d"], 4)
    with pytest.raises(ValueError, match="got 4 prompts for 3 completions"):
        group_batch(prompts, ["a", "b", "c"], 1)


def test_constructor_rejects_bad_settings_and_names_itself_for_trl():
    assert GraceReward("http://x", 4).__name__ == "grace_z"
    assert GraceReward("http://x", 4, signal="Rd", name="relevance").__name__ == "relevance"
    for kwargs, message in [
        ({"num_generations": 0}, "num_generations must be a positive integer"),
        ({"num_generations": 2, "signal": "loss"}, "signal must be one of"),
        ({"num_generations": 2, "max_groups_per_request": 0}, "max_groups_per_request must be at least 1"),
        ({"num_generations": 2, "degenerate_groups": "drop"}, "degenerate_groups must be one of omega_plus, exclude"),
    ]:
        with pytest.raises(ValueError, match=message):
            GraceReward("http://x", **kwargs)


def test_metric_means_cover_parsed_responses_only():
    results = [
        ResponseResult(index=0, parsed=True, metrics=parsed_metrics(length=100.0), weight=1.0),
        ResponseResult(index=1, parsed=True, metrics=parsed_metrics(length=300.0), weight=1.0),
        ResponseResult(index=2, parsed=False, weight=-1.0),
    ]
    means = metric_means(results)
    assert means["parsed"] == pytest.approx(2 / 3) and means["L"] == 200.0 and means["Rd"] == pytest.approx(0.6)
    assert metric_means(results[2:]) == {"parsed": 0.0}  # no parsed response: no metric means, not NaN


# --------------------------------------------------------------------------- against the reward service


def test_z_is_the_services_group_z_in_completion_order(reward_service):
    prompts, completions = sft_groups(2, 3)
    logged: list[tuple[str, float]] = []
    reward = GraceReward(reward_service.url, num_generations=3, api_key=reward_service.api_key)
    rewards = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 6, trainer_state=None,
                     log_metric=lambda name, value: logged.append((name, value)))  # fmt: skip
    expected = score_directly(reward_service, prompts, completions, 3)
    assert all(r.parsed for r in expected)
    assert rewards == [r.z for r in expected]
    for g in range(2):
        assert math.fsum(rewards[3 * g : 3 * g + 3]) == pytest.approx(0.0, abs=1e-9)  # z-normalised inside each group
    assert any(z != 0 for z in rewards)
    means = dict(logged)
    assert means["grace/parsed"] == 1.0
    assert means["grace/L"] == pytest.approx(sum(r.metrics.length for r in expected) / 6)
    assert set(means) == {"grace/parsed", "grace/L", "grace/E", "grace/P", "grace/PG", "grace/PD", "grace/Rs", "grace/Rd"}

    # the same batch in TRL's conversational form gets the same rewards
    conversational = GraceReward(reward_service.url, 3, api_key=reward_service.api_key)(
        prompts=[chat_messages(p) for p in prompts], completions=[[{"role": "assistant", "content": c}] for c in completions]
    )
    assert conversational == rewards


def test_other_signals_and_unparsed_completions(reward_service):
    prompts, completions = sft_groups(1, 3)
    completions[1] = UNPARSED
    expected = score_directly(reward_service, prompts, completions, 3)
    assert [r.parsed for r in expected] == [True, False, True]

    def call(**kwargs) -> list:
        return GraceReward(reward_service.url, 3, api_key=reward_service.api_key, **kwargs)(prompts, completions)

    assert call() == [expected[0].z, None, expected[2].z]  # TRL turns None into NaN: an unscorable completion
    assert call(signal="weight") == [r.weight for r in expected] and expected[1].weight == -1.0
    assert call(signal="rank_sum") == [-expected[0].rank_sum, None, -expected[2].rank_sum]
    assert call(signal="Rs") == [expected[0].metrics.relevance_summary, None, expected[2].metrics.relevance_summary]
    assert call(signal="z", unparsed=-2.0) == [expected[0].z, -2.0, expected[2].z]


def test_a_batch_over_the_service_limit_is_split_and_weights_stay_batch_wide(reward_service):
    """3 groups in 3 requests give the weights one request gives: W is re-normalized over the whole batch."""
    prompts, completions = sft_groups(3, 2)
    completions[3] = UNPARSED
    in_one = GraceReward(reward_service.url, 2, signal="weight", api_key=reward_service.api_key, max_groups_per_request=3)
    in_three = GraceReward(reward_service.url, 2, signal="weight", api_key=reward_service.api_key, max_groups_per_request=1)
    one, three = in_one(prompts, completions), in_three(prompts, completions)
    assert three == pytest.approx(one, abs=1e-12)
    assert one == pytest.approx([r.weight for r in score_directly(reward_service, prompts, completions, 2)], abs=1e-12)
    parsed = [w for i, w in enumerate(one) if i != 3]
    positive, negative = [w for w in parsed if w >= 0], [w for w in parsed if w < 0]
    assert math.fsum(positive) == pytest.approx(len(positive)) and math.fsum(negative) == pytest.approx(-len(negative))

    with pytest.raises(GraceRewardError, match=r"422.*at most 3 groups per request, got 4"):
        GraceReward(reward_service.url, 1, api_key=reward_service.api_key, max_groups_per_request=8)(["q"] * 4, ["r"] * 4)
    with pytest.raises(GraceRewardError, match=r"422.*at most 4 responses per group, got 5"):
        GraceReward(reward_service.url, 5, api_key=reward_service.api_key)(["q"] * 5, ["r"] * 5)


def test_a_wrong_api_key_is_a_clear_error(reward_service):
    with pytest.raises(GraceRewardError, match=r"401 \(check the API key\)"):
        GraceReward(reward_service.url, 1, api_key="wrong")(["q"], ["r"])


def test_waits_for_a_service_that_is_still_loading(tiny_models, tmp_path):
    """Connection refused, then 503 + Retry-After while the models load: retried until the scores come."""
    port = free_port()
    env = {**model_env(tiny_models), "GRACE_REWARD_API_KEY": API_KEY, "GRACE_REWARD_RETRY_AFTER_S": "1",
           "GRACE_REWARD_DTYPE": "fp32"}  # fmt: skip
    command = [sys.executable, "-m", "shared.cli", "serve", "reward", "--host", "127.0.0.1", "--port", str(port), "--no-worker"]
    url = f"http://127.0.0.1:{port}"
    process = ServiceProcess("reward-late", command, tmp_path / "reward.log", env=env, cwd=ROOT).start()
    try:  # called at once: the port is not open yet, then the models are loading
        rewards = GraceReward(url, 2, api_key=API_KEY, retries=120)(["q", "q"], [UNPARSED, UNPARSED])
        assert rewards == [None, None], process.log_tail()
        rejected = [
            line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("grace_reward_rejected_total")
        ]
        assert rejected and float(rejected[0].split()[-1]) >= 1  # it did meet a 503 and waited it out
    finally:
        process.stop()


# --------------------------------------------------------------------------- in a real GRPOTrainer step


class RecordedGraceReward(GraceReward):
    """GraceReward that keeps what TRL passed and what it answered, to check against the service afterwards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        self.calls.append({"prompts": prompts, "completions": completions, "keywords": set(kwargs), "rewards": rewards})
        return rewards


def test_one_grpo_step_on_the_tiny_policy(reward_service, tiny_models, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    queries = sorted(
        (json.loads(line)["query"] for line in (ROOT / "data" / "test_queries.jsonl").open(encoding="utf-8")), key=len
    )
    dataset = Dataset.from_list([{"prompt": chat_messages(q)} for q in queries[:2]])
    z = RecordedGraceReward(reward_service.url, 2, api_key=reward_service.api_key, max_groups_per_request=1)
    weight = RecordedGraceReward(reward_service.url, 2, signal="weight", api_key=reward_service.api_key)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=16, use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=str(tiny_models.policy), reward_funcs=[z, weight], args=args, train_dataset=dataset)
    trainer.train()

    (z_call,), (weight_call,) = z.calls, weight.calls
    assert {"completion_ids", "trainer_state", "log_metric"} <= z_call["keywords"]
    prompts = [prompt_query(p) for p in z_call["prompts"]]
    completions = [completion_text(c) for c in z_call["completions"]]
    assert len(completions) == 4 and sorted(set(prompts)) == sorted(queries[:2])
    expected = score_directly(reward_service, prompts, completions, 2)
    assert z_call["rewards"] == [r.z for r in expected]
    assert weight_call["rewards"] == pytest.approx([r.weight for r in expected], abs=1e-12)
    for g in range(2):
        zs = [v for v in z_call["rewards"][2 * g : 2 * g + 2] if v is not None]
        assert math.fsum(zs) == pytest.approx(0.0, abs=1e-9)

    logs = trainer.state.log_history[0]
    assert logs["rewards/grace_weight/mean"] == pytest.approx(sum(weight_call["rewards"]) / 4)
    assert logs["grace/parsed"] == pytest.approx(sum(r.parsed for r in expected) / 4)
    parsed_z = [v for v in z_call["rewards"] if v is not None]
    if parsed_z:
        assert logs["rewards/grace_z/mean"] == pytest.approx(sum(parsed_z) / len(parsed_z))
    else:  # a tiny random policy rarely closes all three tags in 16 tokens: every z is null, TRL's mean NaN, logged as None
        assert logs["rewards/grace_z/mean"] is None or math.isnan(logs["rewards/grace_z/mean"])
    assert math.isfinite(logs["loss"])
