"""Trainer settings: one self-documenting object, defaults from the paper (3.5, 4.1).

Environment variables use the ``GRACE_TRAINER_`` prefix (``GRACE_TRAINER_BETA=0.1``),
the YAML file in ``GRACE_CONFIG`` its ``trainer:`` section.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from shared.settings import ServiceSettings, service_config

LossName = Literal["grace_kto", "kto", "dpo", "orpo", "sft", "grpo"]


class TrainerSettings(ServiceSettings):
    section: ClassVar[str] = "trainer"
    model_config = service_config("GRACE_TRAINER_")

    # ---- loss (paper 3.5, eq. 10-12; 4.1)
    loss: LossName = Field(
        "grace_kto", description="loss when the run config in Redis names none: grace_kto, kto, dpo, orpo, sft or grpo"
    )
    beta: float = Field(0.05, gt=0, description="beta of eq. 11 (paper 4.1: 0.05); also DPO's beta")
    sft_weight: float = Field(0.1, ge=0, description="mu: weight of the auxiliary SFT loss on positives (paper 4.1: 0.1)")
    lambda_mode: Literal["balanced", "fixed"] = Field(
        "balanced",
        description="balanced: lambda+|Omega+| = lambda-|Omega-| from the iteration's counts; fixed: use the values below",
    )
    lambda_desirable: float = Field(1.0, gt=0, description="lambda+ when lambda_mode=fixed")
    lambda_undesirable: float = Field(1.0, gt=0, description="lambda- when lambda_mode=fixed")
    orpo_alpha: float = Field(0.1, gt=0, description="ORPO's weight of the odds-ratio term")
    grpo_epsilon: float = Field(
        0.2, gt=0, lt=1, description="GRPO's PPO clip: the ratio to the sampling policy is kept in [1-eps, 1+eps]"
    )
    grpo_beta_kl: float = Field(
        0.0,
        ge=0,
        description="GRPO's weight of the k3 KL term to the reference (base model); 0 skips the reference pass (TRL's default)",
    )

    # ---- optimization (paper 4.1)
    learning_rate: float = Field(5e-6, gt=0, description="peak learning rate of the cosine schedule (paper: 5e-6)")
    min_learning_rate: float = Field(1e-6, ge=0, description="final learning rate of the cosine schedule (paper: 1e-6)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warm-up share of the steps (paper: 10%)")
    lr_schedule: Literal["per_iteration", "run"] = Field(
        "per_iteration",
        description=(
            "per_iteration (default): every iteration runs its own cosine (warm-up, peak learning_rate -> "
            "min_learning_rate) with a fresh AdamW, starting from the previous adapter's weights; each round trains "
            "on a fresh dataset sampled from a new policy, so each gets the same warm-up and step sizes, where a "
            "run-long cosine would leave the late rounds at the floor LR. run: one cosine over the whole run, its "
            "length estimated from the run config (iterations, K per round, m, epochs) and batch_size, the AdamW "
            "state carried between iterations in optimizer.pt beside the adapter (not supported under DeepSpeed yet)"
        ),
    )
    batch_size: int = Field(8, ge=1, description="samples (pairs for DPO/ORPO) per optimizer step (paper: 8)")
    epochs: int = Field(1, ge=1, description="epochs over each iteration's samples (paper: 1)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    max_length: int = Field(8192, ge=16, description="longest prompt+response trained on; longer responses are cut")
    micro_batch_tokens: int = Field(
        4096, ge=16, description="padded tokens per forward pass; a batch is split by length into such micro-batches"
    )
    seed: int = Field(0, description="seed of batch order and LoRA init (the iteration is added)")

    # ---- model (paper 4.1: 4-bit QLoRA, rank 64)
    lora_rank: int = Field(64, ge=1, description="LoRA rank r (paper: 64)")
    lora_alpha: int = Field(128, ge=1, description="LoRA alpha (scale alpha/r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 keeps pi_ref = pi at step 0 exact)")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="modules that get LoRA adapters",
    )
    quantization: Literal["auto", "nf4", "none"] = Field(
        "auto", description="auto: 4-bit nf4 QLoRA on CUDA when bitsandbytes is installed, none on CPU"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 on CPU (bf16 autocast on CPU is measured by `grace bench trainer`)"
    )
    attn_implementation: str = Field(
        "auto",
        description="auto: on CUDA flash_attention_2 when importable, else grace_fused_sdpa (SDPA's fused kernels); sdpa on CPU",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", description="auto: on with CUDA, off on CPU")
    # yarn_factor, native_window, rope_scope (ServiceSettings, ``common:``): YaRN is applied at load only with
    # rope_scope=inference_and_training; the default (paper 3.6) trains with the model's native RoPE
    deepspeed: Path | None = Field(
        None,
        description="DeepSpeed JSON config (services/trainer/deepspeed/zero2.json or zero3.json) under the deepspeed launcher",
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (unset = torch's default)")

    # ---- worker
    consumer: str = Field(default_factory=lambda: f"trainer-{socket.gethostname()}", description="consumer name in the group")
    group: str = Field("trainer", description="consumer group on the samples stream")
    read_count: int = Field(256, ge=1, description="stream entries read per call")
    block_ms: int = Field(1000, ge=0, description="how long one read blocks")
    min_idle_ms: int = Field(60_000, ge=0, description="entries pending this long on a dead consumer are taken over")
    lock_ttl_s: int = Field(
        3600, ge=10, description="an iteration a trainer holds is taken over by another trainer after this long"
    )
    max_iterations: int | None = Field(None, ge=1, description="stop after training this many iterations (unset = run forever)")

    @model_validator(mode="after")
    def _run_schedule_needs_own_optimizer(self) -> "TrainerSettings":
        if self.lr_schedule == "run" and self.deepspeed is not None:
            raise ValueError(
                "lr_schedule='run' is not supported under DeepSpeed yet (the AdamW state to carry between "
                "iterations is DeepSpeed's); use lr_schedule='per_iteration'"
            )
        return self
