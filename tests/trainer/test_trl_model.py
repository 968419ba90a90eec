"""On the tiny model: TRL's KTOTrainer loss on a real batch == GRACE-KTO with |W| = 1 on our own log-probs."""

from __future__ import annotations

import pytest
import torch

from services.trainer import losses
from services.trainer.model import Sequence


def _sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> list[Sequence]:
    out = []
    for ids, att, comp in zip(input_ids, attention_mask, completion_mask):
        real = ids[att.bool()].tolist()
        out.append(Sequence(ids=real, prompt_len=int(comp.nonzero()[0])))
    return out


def test_trl_kto_trainer_loss_equals_grace_kto_on_tiny_model(trainer_settings, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from services.trainer.model import load_base, load_tokenizer, lora_config, resolve_runtime, sequence_logps
    from services.trainer.train import Trainer
    from shared.prompts import chat_messages

    settings = trainer_settings
    runtime = resolve_runtime(settings)
    tokenizer = load_tokenizer(settings.policy_model)
    base = load_base(settings.policy_model, runtime, settings.rope())
    rows = []
    for i, (text, label) in enumerate([("alpha beta gamma", True), ("state assets report", False),
                                        ("<summary>x</summary> reform", True), ("capital market outline", False)]):  # fmt: skip
        rows.append({"prompt": chat_messages(f"Write report {i}"),
                     "completion": [{"role": "assistant", "content": text * (i + 1)}], "label": label})  # fmt: skip
    lambda_d, lambda_u, beta = 1.3, 0.8, 0.1
    args = KTOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, beta=beta, desirable_weight=lambda_d,
        undesirable_weight=lambda_u, report_to="none", use_cpu=True, max_length=1024, save_strategy="no",
        dataloader_num_workers=0, disable_dropout=True, logging_steps=1000,
    )  # fmt: skip
    # base model + LoRA config: TRL adds the adapter, and its reference is the adapter disabled, as ours
    trl_trainer = KTOTrainer(model=base, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                             peft_config=lora_config(settings))  # fmt: skip
    model = trl_trainer.model
    batch = next(iter(trl_trainer.get_train_dataloader()))
    ours = Trainer(model, tokenizer, settings, runtime, loss="grace_kto")
    seqs = _sequences(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    kl_seqs = _sequences(batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    ref_kl = ours.logps(kl_seqs, reference=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-trivial adapter, so the policy differs from the reference
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # ... that likes the mismatched completions: the KL estimate is positive, z_ref not clamped
        (-sequence_logps(model, kl_seqs, 0, runtime).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.train()
    trl_loss = trl_trainer.compute_loss(model, batch)
    trl_kl = trl_trainer._metrics["train"]["kl"][-1]

    policy, reference = ours.logps(seqs), ours.logps(seqs, reference=True)
    z_ref = losses.kl_reference_point(ours.logps(kl_seqs), ref_kl)
    weights = torch.where(batch["label"].bool(), 1.0, -1.0)
    loss = losses.grace_kto_loss(policy, reference, weights, z_ref, beta, lambda_d, lambda_u)

    assert not torch.allclose(policy, reference, atol=1e-3), "the adapter must change the log-probs"
    assert float(z_ref) > 0.05
    assert float(z_ref) == pytest.approx(trl_kl, rel=1e-4, abs=1e-5)
    assert float(loss) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-6)
