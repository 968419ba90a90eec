"""Request and response models of the judge API (``/v1/judge``, ``/v1/judge/batch``, ``/v1/judge/pairwise``).

Field names follow OpenAI where OpenAI has one (``usage.prompt_tokens``). A judgment whose answer held no
usable verdict after its parse retries is a 200 with ``score`` (or ``winner``) null and ``parse_error``
saying why: it cost tokens and says something about the judge, so it is a result, not an error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.schemas import JudgeCriteria, NonEmptyStr

Winner = Literal["a", "b", "tie"]


class Usage(BaseModel):
    """Tokens the backend reported and what they cost at the configured prices; zero for a cached judgment."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float = Field(0.0, description="in the unit of the configured per-1M-token prices (USD on OpenAI's list)")

    @classmethod
    def priced(cls, prompt_tokens: int, completion_tokens: int, prompt_per_1m: float, completion_per_1m: float) -> Usage:
        cost = (prompt_tokens * prompt_per_1m + completion_tokens * completion_per_1m) / 1_000_000
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, cost=cost)  # fmt: skip

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cost=self.cost + other.cost,
        )


class JudgeResult(BaseModel):
    """What one appendix E answer says: the five criteria, the analysis, their mean x 10."""

    criteria: JudgeCriteria
    analysis: str
    score: float = Field(description="mean of the five criteria x 10")


class PairwiseVerdict(BaseModel):
    """What one pairwise answer says, in the positions the judge saw (A first, B second)."""

    winner: Literal["A", "B", "tie"]
    analysis: str


class JudgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: NonEmptyStr
    response: str
    reference: str | None = Field(None, description="a reference answer the judge compares against (optional)")


class Judgment(BaseModel):
    """``/v1/judge``: the appendix E judgement, or null scores and the reason when no answer could be parsed."""

    criteria: JudgeCriteria | None = None
    analysis: str = ""
    score: float | None = Field(None, description="mean of the five criteria x 10; null when no answer parsed")
    parse_error: str | None = Field(None, description="why no answer parsed (after the parse retries)")
    usage: Usage = Field(default_factory=Usage)
    cached: bool = Field(False, description="answered from the judgment cache, at no cost")

    def result(self) -> JudgeResult | None:
        """The scores alone, as an evaluation record keeps them; None for a null judgment."""
        if self.criteria is None or self.score is None:
            return None
        return JudgeResult(criteria=self.criteria, analysis=self.analysis, score=self.score)


class JudgeBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[JudgeRequest] = Field(min_length=1)


class JudgeBatchItem(BaseModel):
    index: int
    result: Judgment | None = None
    error: str | None = Field(None, description="why the backend gave no answer (the /v1/judge 502 message)")


class JudgeBatchResponse(BaseModel):
    items: list[JudgeBatchItem]
    usage: Usage = Field(default_factory=Usage, description="the sum over the items")


class PairwiseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: NonEmptyStr
    response_a: str
    response_b: str
    reference: str | None = Field(None, description="a reference answer the judge compares against (optional)")


class PairwiseGame(BaseModel):
    """One order of the pair: ``ab`` shows response_a first, ``ba`` shows response_b first."""

    order: Literal["ab", "ba"]
    winner: Winner | None = Field(None, description="in the request's terms (a = response_a); null when unparsed")
    analysis: str = ""
    parse_error: str | None = None
    usage: Usage = Field(default_factory=Usage)
    cached: bool = False


class PairwiseJudgment(BaseModel):
    """``/v1/judge/pairwise``: both orders (position bias shows as disagreement), as in FastChat and AlpacaEval."""

    winner: Winner | None = Field(
        None, description="the games' common winner; tie when they disagree; null when either game is unparsed"
    )
    consistent: bool | None = Field(None, description="both orders named the same winner; null when one is unparsed")
    games: list[PairwiseGame]
    usage: Usage = Field(default_factory=Usage, description="the sum over both games")
    cached: bool = Field(False, description="both games came from the judgment cache")
