"""Pydantic models for every Redis stream payload and every HTTP body.

Stream messages travel as two fields, ``type`` (the model's ``kind``) and
``data`` (its JSON); ``decode_message`` turns them back into a model.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# --------------------------------------------------------------------------- streams

STREAM_ROLLOUTS = "grace:rollouts"  # RolloutGroup ... IterationComplete(stage="rollout")
STREAM_SAMPLES = "grace:samples"  # WeightedSample ... IterationComplete(stage="reward")
STREAM_ADAPTERS = "grace:adapters"  # AdapterEvent (trainer) and AdapterStatus (rollout replicas)


class Metrics(BaseModel):
    """Per-response metrics of paper 3.3 (appendix A)."""

    length: float = Field(description="L: tokens of the document")
    diversity: float = Field(description="E: unique n-grams / n-grams x 100")
    professionalism: float = Field(description="P = general_perplexity - domain_perplexity")
    general_perplexity: float
    domain_perplexity: float
    relevance_summary: float = Field(description="Rs: BGE-M3 query vs summary")
    relevance_document: float = Field(description="Rd: BGE-M3 query vs document")


# The paper's symbols for the Metrics fields: the names of per-metric logs and health figures.
METRIC_SYMBOLS: dict[str, str] = {
    "L": "length", "E": "diversity", "P": "professionalism", "PPL_G": "general_perplexity",
    "PPL_D": "domain_perplexity", "Rs": "relevance_summary", "Rd": "relevance_document",
}  # fmt: skip

QuerySource = Literal["generated", "seed_fallback", "offline"]
FINISH_TRUNCATED = "length"  # OpenAI finish_reason of a response cut by max_tokens or the window


class StreamPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str]
    run_id: str
    iteration: int = Field(ge=0)


class RolloutGroup(StreamPayload):
    """One query and its m sampled responses (paper 3.3)."""

    kind: ClassVar[str] = "rollout_group"
    group_id: str = Field(description="unique within the run, e.g. '<run>:<iteration>:<index>'")
    group_index: int = Field(ge=0)
    query: str
    responses: list[str]
    adapter_version: str = Field("base", description="adapter the responses were sampled from")
    query_source: QuerySource = Field(
        "generated", description="generated (3.2), an unused seed query (seed_fallback), or the offline set (generated once)"
    )
    finish_reasons: list[str | None] = Field(
        default_factory=list, description="OpenAI finish_reason per response ('length' = truncated); empty if unknown"
    )
    created_at: float = Field(default_factory=time.time)


class WeightedSample(StreamPayload):
    """One response with its calibrated weight W (eq. 8-9)."""

    kind: ClassVar[str] = "weighted_sample"
    sample_id: str = Field(description="'<group_id>:<response_index>', the idempotency key")
    group_id: str
    response_index: int = Field(ge=0)
    query: str
    response: str
    weight: float
    label: Literal["desirable", "undesirable"]
    parsed: bool
    z: float | None = None
    rank_sum: float | None = None
    metrics: Metrics | None = None
    finish_reason: str | None = Field(None, description="'length' = cut by the token limit")
    adapter_version: str | None = Field(None, description="adapter that sampled the response")
    query_source: QuerySource | None = None


class IterationComplete(StreamPayload):
    """Closes an iteration on a stream: ``count`` items were published before it."""

    kind: ClassVar[str] = "iteration_complete"
    stage: Literal["rollout", "reward"]
    count: int = Field(ge=0)


class AdapterEvent(StreamPayload):
    """A new LoRA adapter in the adapter store, published by the trainer."""

    kind: ClassVar[str] = "adapter_event"
    version: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    path: str
    checksum: str = Field(description="sha256 over the adapter's files, see shared.adapters.adapter_checksum")
    rank: int = Field(ge=1)
    loss: str = "grace_kto"
    created_at: float = Field(default_factory=time.time)


class AdapterStatus(StreamPayload):
    """What a rollout replica did with an AdapterEvent."""

    kind: ClassVar[str] = "adapter_status"
    version: str
    replica: str
    status: Literal["loaded", "rejected"]
    reason: str | None = None


PAYLOAD_TYPES: dict[str, type[StreamPayload]] = {
    cls.kind: cls for cls in (RolloutGroup, WeightedSample, IterationComplete, AdapterEvent, AdapterStatus)
}


def encode_message(payload: StreamPayload) -> dict[str, str]:
    return {"type": payload.kind, "data": payload.model_dump_json()}


def decode_message(fields: dict) -> StreamPayload:
    """Fields of a stream entry (bytes or str) -> payload model; ValueError if unknown or invalid."""
    fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in fields.items()}
    kind = fields.get("type")
    if kind not in PAYLOAD_TYPES:
        raise ValueError(f"unknown message type {kind!r}")
    return PAYLOAD_TYPES[kind].model_validate_json(fields.get("data", ""))


def entry_identity(fields: dict[str, str], kind: str, id_field: str) -> tuple[str, int, str] | None:
    """(run_id, iteration, data[id_field]) of a ``kind`` stream entry, read from its raw JSON.

    For entries being dead-lettered: one that fails validation can still say
    which iteration it belonged to, so that iteration can complete without it.
    None if the entry is of another type or does not name all three.
    """
    if fields.get("type") != kind:
        return None
    try:
        data = json.loads(fields.get("data", ""))
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    run_id, iteration, item_id = data.get("run_id"), data.get("iteration"), data.get(id_field)
    if isinstance(run_id, str) and run_id and isinstance(item_id, str) and item_id:
        if isinstance(iteration, int) and not isinstance(iteration, bool) and iteration >= 0:
            return run_id, iteration, item_id
    return None


# --------------------------------------------------------------------------- reward API

NonEmptyStr = Annotated[str, Field(min_length=1)]


class ScoreGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: NonEmptyStr
    responses: list[str] = Field(min_length=1)
    finish_reasons: list[str | None] | None = Field(
        None, description="optional OpenAI finish_reason per response, echoed in the results ('length' = truncated)"
    )

    @model_validator(mode="after")
    def _one_finish_reason_per_response(self) -> "ScoreGroup":
        if self.finish_reasons is not None and len(self.finish_reasons) != len(self.responses):
            raise ValueError(f"finish_reasons has {len(self.finish_reasons)} entries for {len(self.responses)} responses")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[ScoreGroup] = Field(min_length=1)


class ResponseResult(BaseModel):
    index: int
    parsed: bool
    metrics: Metrics | None = None
    rank_sum: float | None = None
    z: float | None = None
    weight: float
    finish_reason: str | None = None


class GroupResult(BaseModel):
    query: str | None = None
    results: list[ResponseResult]


class ScoreResponse(BaseModel):
    groups: list[GroupResult]


class MetricsInput(Metrics):
    """Metrics sent to /v1/calibrate: numbers only (no true/false as 1/0), no unknown keys, as the schema says."""

    model_config = ConfigDict(extra="forbid", strict=True)


class CalibrateItem(BaseModel):
    # the schema says what check_calibrate_body enforces: parsed=true needs metrics
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"parsed": {"const": True}}},
            "then": {"required": ["metrics"], "properties": {"metrics": {"type": "object"}}},
        },
    )
    parsed: bool
    metrics: MetricsInput | None = None


class CalibrateGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    responses: list[CalibrateItem] = Field(min_length=1)


class CalibrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[CalibrateGroup] = Field(min_length=1)


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward body (``--remote_rm_url``): one entry per sample, flat lists."""

    model_config = ConfigDict(extra="forbid")
    query: list[str] = Field(min_length=1, description="prompt + response of each sample, as the policy saw them")
    prompts: list[NonEmptyStr] = Field(
        description="the prompt of each sample, a prefix of its query; samples sharing a prompt form one group"
    )
    labels: list | None = Field(None, description="OpenRLHF's --label_key values: accepted, not used")
    metas: list | None = Field(None, description="sent by newer OpenRLHF versions: accepted, not used")

    @model_validator(mode="after")
    def _one_prompt_per_query(self) -> "GetRewardRequest":
        if len(self.prompts) != len(self.query):
            raise ValueError(f"prompts has {len(self.prompts)} entries for {len(self.query)} queries")
        return self


class GetRewardResponse(BaseModel):
    """OpenRLHF's remote reward answer, one entry per sample in request order."""

    rewards: list[float] = Field(
        description="the group Z of eq. 6-7 (higher = better, mean 0 over the group's parsed samples); "
        "an unparsed sample gets 1 less than the lowest Z of its group"
    )
    scores: list[float] = Field(description="the calibrated weight W of eq. 8-9 over the whole call (-1 when unparsed)")
    extra_logs: dict[str, list[float]] = Field(
        description="per-sample lists logged by OpenRLHF: each metric by symbol (L, E, P, PPL_G, PPL_D, Rs, Rd; "
        "0 when unparsed), parsed (1/0), rank_sum (0 when unparsed) and zero_variance_group (1 if the sample's "
        "group carries no ranking signal)"
    )


# --------------------------------------------------------------------------- judge API

CRITERIA = (
    "content_accuracy_relevance",
    "tone_formality",
    "idea_development_argumentation",
    "structure_clarity",
    "persuasiveness_effectiveness",
)

Score10 = Annotated[int, Field(ge=1, le=10)]


class JudgeCriteria(BaseModel):
    content_accuracy_relevance: Score10
    tone_formality: Score10
    idea_development_argumentation: Score10
    structure_clarity: Score10
    persuasiveness_effectiveness: Score10
