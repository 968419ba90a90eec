"""One RoPE setting per run (paper 3.6): the YaRN factor, the native window and where YaRN applies.

The paper extends the context with "YaRN in vLLM to extend to 32k at
inference": the rollout serves ``yarn_factor`` x the native window, and by
default the trainer and the SFT stage keep the model's native RoPE
(``scope="inference"``). ``scope="inference_and_training"`` also trains under
the same YaRN frequencies the rollout samples with.

The values are set once (``common:`` in the settings YAML), recorded in the
run's ``RunConfig.rope``, and every service refuses a run whose values differ
from its own (``check_rope``). Pure: no I/O.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RopeScope = Literal["inference", "inference_and_training"]


class RopeConfig(BaseModel):
    """The RoPE setting of a run (paper 3.6). Values are compared as configured: ``native_window=None``
    (the model's config.json) and an explicit window count as different settings."""

    model_config = ConfigDict(frozen=True)

    yarn_factor: float = Field(4.0, gt=0, description="YaRN rope scaling factor (1 = off): window = factor x native")
    native_window: int | None = Field(None, ge=1, description="the model's native context (None = its config.json)")
    scope: RopeScope = Field(
        "inference",
        description="inference: YaRN only when sampling (paper 3.6); inference_and_training: also the trainer and SFT",
    )

    @property
    def yarn(self) -> bool:
        """Whether YaRN is on at all (factor above 1)."""
        return self.yarn_factor > 1.0

    def window(self, native: int) -> int:
        """The native window: the override, else ``native`` (the model's config.json)."""
        return self.native_window or native

    def served_window(self, native: int) -> int:
        """The context the rollout serves: ``yarn_factor`` x the native window (the native window when off)."""
        return int(max(self.yarn_factor, 1.0) * self.window(native))

    def training_factor(self) -> float | None:
        """The YaRN factor the trainer and SFT load the model with, or None for native RoPE."""
        return self.yarn_factor if self.yarn and self.scope == "inference_and_training" else None

    def describe(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.model_dump().items())


def yarn_parameters(factor: float, native: int, rope_theta: float) -> dict:
    """transformers' / vLLM's ``rope_parameters`` for YaRN over ``native`` positions; pair it with
    ``max_position_embeddings = factor * native``. rope_theta is repeated on purpose: vLLM falls back to 1e6
    without it."""
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": native,
            "rope_theta": rope_theta}  # fmt: skip


class RopeMismatch(ValueError):
    """A run asks for other RoPE settings than a service is set to: that service refuses the run."""


def rope_differences(run: RopeConfig, mine: RopeConfig) -> list[tuple[str, object, object]]:
    """(field, run's value, service's value) for every field that differs."""
    return [(name, getattr(run, name), getattr(mine, name))
            for name in RopeConfig.model_fields if getattr(run, name) != getattr(mine, name)]  # fmt: skip


def check_rope(run_id: str, run: RopeConfig | None, mine: RopeConfig, service: str) -> None:
    """Raises ``RopeMismatch`` naming each differing field with both values, e.g.
    ``run r1 asks for yarn_factor=1.0 but the trainer is set to yarn_factor=4.0``.

    ``run=None`` (a run recorded before runs carried their RoPE setting) is not checked.
    """
    if run is None:
        return
    diffs = rope_differences(run, mine)
    if diffs:
        asked = ", ".join(f"{name}={ran}" for name, ran, _ in diffs)
        have = ", ".join(f"{name}={own}" for name, _, own in diffs)
        raise RopeMismatch(
            f"run {run_id} asks for {asked} but the {service} is set to {have} "
            "(one RoPE setting per run: set yarn_factor, native_window and rope_scope once in the common: section)"
        )
