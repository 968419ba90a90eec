"""Training on the tiny model: weights steer log-probs, padding-free batching is exact, adapters load in peft."""

from __future__ import annotations

import random

import pytest
import torch

from services.trainer.model import Sequence, load_adapter_weights, reset_adapter, save_adapter, sequence_logps
from services.trainer.train import Trainer
from shared.schemas import WeightedSample

HIGH_WORDS = "reform governance capital strategy supervision enterprise".split()
LOW_WORDS = "banana weather holiday guitar football pizza".split()
# one vocabulary per weight class, so each class's log-probs move on their own
CLASS_WORDS = {
    2.0: HIGH_WORDS,
    0.2: "market report policy outline summary budget".split(),
    -0.2: "river mountain forest ocean desert island".split(),
    -2.0: LOW_WORDS,
}


def _sample(i: int, group: int, weight: float, words: list[str], rng: random.Random) -> WeightedSample:
    text = " ".join(rng.choice(words) for _ in range(rng.randint(12, 30)))
    return WeightedSample(
        run_id="t", iteration=0, sample_id=f"g{group}:{i}", group_id=f"g{group}", response_index=i,
        query=f"Write a report on topic {group}", response=f"<summary>{text}</summary><outline>1. a</outline><answer>{text}</answer>",
        weight=weight, label="desirable" if weight >= 0 else "undesirable", parsed=True,
    )  # fmt: skip


def _logps(trainer: Trainer, samples: list[WeightedSample]) -> torch.Tensor:
    return trainer.logps([trainer.encode(s.query, s.response) for s in samples])


def test_short_training_raises_high_weight_samples_relative_to_low_weight(trainer_policy):
    model, tokenizer, runtime, settings = trainer_policy
    settings = settings.model_copy(update={"batch_size": 4, "epochs": 2, "learning_rate": 1e-3, "beta": 0.1, "sft_weight": 0.0})
    rng = random.Random(0)
    samples, kinds = [], []
    for group in range(2):
        for i, (weight, words) in enumerate(CLASS_WORDS.items()):
            samples.append(_sample(i, group, weight, words, rng))
            kinds.append(weight)
    trainer = Trainer(model, tokenizer, settings, runtime, loss="grace_kto")
    before = _logps(trainer, samples)
    result = trainer.train(samples, iteration=0)
    delta = _logps(trainer, samples) - before

    def mean(weight: float) -> float:
        return float(delta[[k == weight for k in kinds]].mean())

    assert result.steps == 4 and len(result.metrics) == 4
    assert mean(2.0) > 0 > mean(-2.0), "desirable log-probs rise, undesirable fall"
    assert mean(2.0) - mean(-2.0) > mean(0.2) - mean(-0.2) > 0, "a larger |W| moves further"
    row = result.metrics[-1]
    for key in ("loss", "z_ref", "lr", "reward_margin", "weight_abs_mean", "weight_abs_max", "grad_norm"):
        assert key in row
    assert result.metrics[-1]["lr"] < result.metrics[0]["lr"]  # cosine decay


def test_padding_free_micro_batches_equal_single_sequences(trainer_policy):
    model, tokenizer, runtime, _ = trainer_policy
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    seqs = [Sequence(ids=list(range(3, 3 + n)), prompt_len=p) for n, p in [(40, 10), (25, 20), (33, 5)]]
    together = sequence_logps(model, seqs, tokenizer.pad_token_id, runtime)
    alone = torch.cat([sequence_logps(model, [s], tokenizer.pad_token_id, runtime) for s in seqs])
    assert torch.allclose(together, alone, atol=1e-4)
    # the gradient of a summed loss is the same either way
    together.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for s in seqs:
        sequence_logps(model, [s], tokenizer.pad_token_id, runtime).sum().backward()
    for name, param in model.named_parameters():
        if name in grads:
            assert torch.allclose(param.grad, grads[name], atol=1e-4), name


def test_adapter_round_trip_through_files_and_peft(trainer_policy, tmp_path):
    from peft import PeftModel

    from services.trainer.model import load_base

    model, tokenizer, runtime, settings = trainer_policy
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    seqs = [Sequence(ids=list(range(5, 60)), prompt_len=20)]
    expected = sequence_logps(model, seqs, 0, runtime).detach()
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    peft_model = PeftModel.from_pretrained(load_base(settings.policy_model, runtime, settings.rope()), tmp_path / "adapter")
    assert torch.allclose(sequence_logps(peft_model, seqs, 0, runtime), expected, atol=1e-5)

    reset_adapter(model, seed=1)
    reset = sequence_logps(model, seqs, 0, runtime).detach()
    with model.disable_adapter():
        base = sequence_logps(model, seqs, 0, runtime).detach()
    assert torch.allclose(reset, base, atol=1e-6), "a reset adapter equals the reference"
    load_adapter_weights(model, tmp_path / "adapter")
    assert torch.allclose(sequence_logps(model, seqs, 0, runtime), expected, atol=1e-5)


@pytest.mark.parametrize("loss", ["kto", "dpo", "orpo", "sft"])
def test_baselines_train_and_report(trainer_policy, loss):
    model, tokenizer, runtime, settings = trainer_policy
    rng = random.Random(1)
    samples = [
        _sample(i, g, w, HIGH_WORDS if w >= 0 else LOW_WORDS, rng) for g in range(2) for i, w in enumerate([1.0, -0.5, 0.3, -1.2])
    ]
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    result = Trainer(model, tokenizer, settings.model_copy(update={"batch_size": 4}), runtime, loss=loss).train(samples)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert result.steps >= 1 and all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the adapter must change"
    if loss in ("dpo", "orpo"):
        assert result.samples == 4  # one best-vs-worst pair per group


def test_grpo_raises_high_advantage_responses(trainer_policy):
    model, tokenizer, runtime, settings = trainer_policy
    settings = settings.model_copy(update={"batch_size": 8, "epochs": 4, "learning_rate": 5e-4, "grpo_beta_kl": 0.05})
    # token-mean loss: high and low responses of a group get equal token counts (one-token words, paired lengths),
    # so the group's advantages sum to 0 over its tokens too and the shared template tokens get no net push
    low_words = "market report policy summary".split()
    samples = []
    for group in range(2):
        for i, (z, words) in enumerate([(1.2, HIGH_WORDS), (0.5, HIGH_WORDS), (-0.5, low_words), (-1.2, low_words)]):
            rng = random.Random(10 * group + min(i, 3 - i))  # the same length for 1.2 / -1.2 and for 0.5 / -0.5
            samples.append(_sample(i, group, z, words, rng).model_copy(update={"z": z}))
    trainer = Trainer(model, tokenizer, settings, runtime, loss="grpo")
    before = _logps(trainer, samples)
    result = trainer.train(samples, iteration=0)
    delta = _logps(trainer, samples) - before
    high = float(delta[[s.z is not None and s.z > 0 for s in samples]].mean())
    low = float(delta[[s.z is None or s.z < 0 for s in samples]].mean())
    assert result.loss == "grpo" and result.steps == 4 and result.tokens > 0
    assert high > 0.5 and high - low > 1.0, "high-advantage log-probs rise, well above the low-advantage ones"
    first = result.metrics[0]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-3), "the first step is on the sampling policy"
    for key in ("loss", "lr", "grad_norm", "advantage_mean", "advantage_min", "clip_ratio", "kl"):
        assert key in first


def test_train_plan_steps_once_per_batch_and_weighs_tokens(trainer_policy):
    """The SFT stage's rounds run on the shared epoch loop: one step per batch of the plan, and the token
    weights scale the token-mean NLL (all weights 3 -> 3x the first step's loss, same starting weights)."""
    model, tokenizer, runtime, settings = trainer_policy
    rng = random.Random(1)
    samples = [_sample(i, 0, 1.0, HIGH_WORDS, rng) for i in range(6)]
    encode = Trainer(model, tokenizer, settings, runtime, "sft").encode
    plan = [[encode(s.query, s.response) for s in samples[:4]], [encode(s.query, s.response) for s in samples[4:]]]
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain = Trainer(model, tokenizer, settings, runtime, "sft").train_plan(plan)
    model.load_state_dict(start)
    tripled = Trainer(model, tokenizer, settings, runtime, "sft").train_plan(plan, lambda targets: torch.full(targets.shape, 3.0))
    assert [r["step"] for r in plain.metrics] == [1, 2] and plain.steps == 2 and plain.samples == 6
    assert tripled.metrics[0]["loss"] == pytest.approx(3 * plain.metrics[0]["loss"], rel=1e-5)
    assert plain.metrics[0]["tokens"] == sum(len(s.ids) for s in plan[0])
