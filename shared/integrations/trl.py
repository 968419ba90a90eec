"""GRACE as a TRL reward function: ``GRPOTrainer(reward_funcs=[GraceReward(url, num_generations)])``.

TRL hands a reward function the whole batch (``prompts``, ``completions`` and
the dataset's columns as keywords) but not the group size, while GRACE ranks
responses inside each prompt's group (eq. 5-7) and weighs them across the
batch (eq. 8-9). TRL's samplers put each prompt's ``num_generations``
completions next to each other, so ``GraceReward`` is told the group size,
checks that every run of ``num_generations`` shares one prompt, and sends the
groups to the reward service's ``POST /v1/score``.

Only I/O lives in ``GraceReward.__call__``; grouping, text extraction and
signal selection are pure functions below, testable without a service.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from shared.calibration import calibrate
from shared.schemas import ResponseResult
from shared.service_client import RewardClient, ServiceError

# The paper's short names of the metrics (3.3) -> their fields in the API's ``metrics`` object.
METRIC_FIELDS = {
    "L": "length",
    "E": "diversity",
    "P": "professionalism",
    "PG": "general_perplexity",
    "PD": "domain_perplexity",
    "Rs": "relevance_summary",
    "Rd": "relevance_document",
}
CALIBRATED_SIGNALS = ("z", "weight", "rank_sum")
SIGNALS = (*CALIBRATED_SIGNALS, *METRIC_FIELDS, *METRIC_FIELDS.values())
DEGENERATE_MODES = ("omega_plus", "exclude")


class GraceRewardError(RuntimeError):
    """The reward service refused or failed a request; the message is the service's own."""


# --------------------------------------------------------------------------- pure helpers


def resolve_signal(signal: str) -> str:
    """``signal`` as the name read from a result: z, weight, rank_sum, or a ``Metrics`` field name."""
    if signal in CALIBRATED_SIGNALS or signal in METRIC_FIELDS.values():
        return signal
    if signal in METRIC_FIELDS:
        return METRIC_FIELDS[signal]
    raise ValueError(f"signal must be one of {', '.join(SIGNALS)}; got {signal!r}")


def message_text(content: Any) -> str:
    """Text of one chat message's ``content``: a string, or a list of content blocks (the text blocks joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict) and block.get("type") == "text")
    raise ValueError(f"message content must be a string or a list of content blocks, got {type(content).__name__}")


def _messages(value: Any, what: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError(f"{what} must be a string or a list of chat messages, got {type(value).__name__}")
    return value


def prompt_query(prompt: str | list[dict]) -> str:
    """The request a prompt makes: the text itself, or the last user message of a conversation.

    The system prompt (e.g. paper 3.1's format instructions) is left out: the
    service compares the query with the summary and the document (Rs, Rd),
    and instructions about tags would only blur that relevance. A conversation
    without a user message is read as all its messages' text.
    """
    if isinstance(prompt, str):
        return prompt
    messages = _messages(prompt, "a prompt")
    users = [m for m in messages if m.get("role") == "user"]
    if users:
        return message_text(users[-1].get("content"))
    return "\n\n".join(message_text(m.get("content")) for m in messages)


def completion_text(completion: str | list[dict]) -> str:
    """The response to score: the text itself, or the content of the conversation's last assistant message."""
    if isinstance(completion, str):
        return completion
    messages = _messages(completion, "a completion")
    assistants = [m for m in messages if m.get("role") == "assistant"]
    return message_text(assistants[-1].get("content")) if assistants else ""


def group_batch(prompts: Sequence[Any], completions: Sequence[Any], num_generations: int) -> list[tuple[str, list[str]]]:
    """(query, responses) per run of ``num_generations`` consecutive completions, which must share one prompt."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions; TRL passes one prompt per completion")
    if len(completions) % num_generations:
        raise ValueError(
            f"{len(completions)} completions do not split into groups of num_generations={num_generations}; pass the "
            "trainer's num_generations (and, with several processes, make per_device_train_batch_size x "
            "steps_per_generation a multiple of it, so each process holds whole groups)"
        )
    groups = []
    for start in range(0, len(completions), num_generations):
        group_prompts = prompts[start : start + num_generations]
        for offset, prompt in enumerate(group_prompts[1:], 1):
            if prompt != group_prompts[0]:
                raise ValueError(
                    f"completions {start}..{start + num_generations - 1} should share one prompt (a group of "
                    f"num_generations={num_generations}), but completion {start + offset} has another prompt; is "
                    "num_generations the trainer's (num_generations_eval when evaluating)?"
                )
        query = prompt_query(group_prompts[0])
        groups.append((query, [completion_text(c) for c in completions[start : start + num_generations]]))
    return groups


def chunk_groups(groups: list, max_groups: int) -> list[list]:
    """Consecutive slices of at most ``max_groups`` groups: one /v1/score request each."""
    return [groups[i : i + max_groups] for i in range(0, len(groups), max_groups)]


def signal_value(result: ResponseResult, signal: str) -> float | None:
    """The chosen signal of one scored response; None where the service gives none (an unparsed response).

    ``rank_sum`` is negated (rank 1 = best, so a lower sum is better) so that a
    higher reward is always better; metrics are returned as they are (note that
    a lower PD/PG perplexity is the better one).
    """
    if signal == "z":
        return result.z
    if signal == "weight":
        return result.weight
    if signal == "rank_sum":
        return None if result.rank_sum is None else -result.rank_sum
    return None if result.metrics is None else getattr(result.metrics, signal)


def batch_weights(results: list[list[ResponseResult]], degenerate_groups: str) -> list[list[float]]:
    """W (eq. 8-9) over all the batch's groups, from the metrics the service returned.

    Needed when a batch took several requests: the service normalizes over
    each request's groups only. Uses the service's own pure calibration.
    """
    metrics = [[r.metrics if r.parsed else None for r in group] for group in results]
    return [[c.weight for c in group] for group in calibrate(metrics, degenerate_groups=degenerate_groups)]


def metric_means(results: list[ResponseResult]) -> dict[str, float]:
    """Batch means for TRL's log: ``parsed`` (share of parsed responses) and each metric over the parsed ones."""
    parsed = [r.metrics for r in results if r.parsed and r.metrics is not None]
    means = {"parsed": len(parsed) / len(results)} if results else {}
    for short, name in METRIC_FIELDS.items():
        if parsed:
            means[short] = math.fsum(getattr(m, name) for m in parsed) / len(parsed)
    return means


# --------------------------------------------------------------------------- the reward function


class GraceReward:
    """A TRL ``reward_funcs`` entry scoring completions with the GRACE reward service.

    Args:
        url: the reward service's base URL, e.g. ``http://127.0.0.1:8100``.
        num_generations: the trainer's ``num_generations`` (the group size).
        signal: what each completion gets back:
            ``"z"`` its group z-score of the negated rank sum (eq. 6-7; 0 in an all-tied group);
            ``"weight"`` the calibrated global weight W (eq. 8-9) over the whole batch;
            ``"rank_sum"`` the negated rank sum (eq. 5), so higher is better;
            a metric, by the paper's name (L, E, P, PG, PD, Rs, Rd) or its API field name (length, ...).
        api_key: the service's bearer key (``GRACE_REWARD_API_KEY``), if it has one.
        unparsed: the reward of a response the service could not parse (a tag missing).
            None (default) returns what the service says: null for ``z``, ``rank_sum``
            and the metrics, which TRL reads as NaN (with no other reward function, an
            unscorable completion: advantage 0, left out of its group's baseline),
            and -1 for ``weight``. Set e.g. -1.0 to penalize format failures instead.
        max_groups_per_request: groups per /v1/score request (keep within the service's
            ``max_groups``); a larger batch is sent in several requests.
        degenerate_groups: the service's ``degenerate_groups`` setting; only used to
            re-normalize ``weight`` over a batch that took several requests.
        timeout: seconds per HTTP request (scoring long documents on CPU is slow).
        retries: how often a 503 (busy or loading: waits Retry-After), and how often a transport error, is retried.
        name: the name TRL logs the reward under (``rewards/<name>/mean``); default ``grace_<signal>``.
    """

    def __init__(
        self,
        url: str,
        num_generations: int,
        signal: str = "z",
        api_key: str | None = None,
        *,
        unparsed: float | None = None,
        max_groups_per_request: int = 64,
        degenerate_groups: str = "omega_plus",
        timeout: float = 300.0,
        retries: int = 5,
        name: str | None = None,
    ):
        if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 1:
            raise ValueError(f"num_generations must be a positive integer, got {num_generations!r}")
        if max_groups_per_request < 1:
            raise ValueError(f"max_groups_per_request must be at least 1, got {max_groups_per_request}")
        if degenerate_groups not in DEGENERATE_MODES:
            raise ValueError(f"degenerate_groups must be one of {', '.join(DEGENERATE_MODES)}, got {degenerate_groups!r}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        self.url = url.rstrip("/")
        self.num_generations = num_generations
        self.signal = resolve_signal(signal)
        self.api_key = api_key
        self.unparsed = unparsed
        self.max_groups_per_request = max_groups_per_request
        self.degenerate_groups = degenerate_groups
        self.timeout = timeout
        self.retries = retries
        # TRL names a reward function by its __name__ (rewards/<name>/mean in the logs).
        self.__name__ = name or f"grace_{signal}"

    def __repr__(self) -> str:
        return f"GraceReward(url={self.url!r}, num_generations={self.num_generations}, signal={self.signal!r})"

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One reward per completion, in order; other TRL keywords (completion_ids, trainer_state, columns) are ignored."""
        groups = group_batch(prompts, completions, self.num_generations)
        results = self.score(groups)
        values = [[signal_value(r, self.signal) for r in group] for group in results]
        if self.signal == "weight" and len(groups) > self.max_groups_per_request:
            values = batch_weights(results, self.degenerate_groups)
        if self.unparsed is not None:
            values = [[self.unparsed if not r.parsed else v for r, v in zip(rs, vs)] for rs, vs in zip(results, values)]
        if log_metric is not None:
            for short, mean in metric_means([r for group in results for r in group]).items():
                log_metric(f"grace/{short}", mean)
        return [v for group in values for v in group]

    def score(self, groups: list[tuple[str, list[str]]]) -> list[list[ResponseResult]]:
        """The service's results for each (query, responses) group, in order, over as many requests as needed.

        A 503 waits Retry-After and a transport error ~1 s, ``retries`` times each; other errors raise."""
        results: list[list[ResponseResult]] = []
        client = RewardClient(self.url, self.api_key, timeout=self.timeout, busy_retries=self.retries,
                              transport_retries=self.retries)  # fmt: skip
        with client:
            for chunk in chunk_groups(groups, self.max_groups_per_request):
                try:
                    scored = client.score(chunk)
                except ServiceError as exc:
                    raise GraceRewardError(str(exc)) from exc
                if len(scored.groups) != len(chunk):
                    raise GraceRewardError(f"/v1/score answered {len(scored.groups)} groups for {len(chunk)}")
                results.extend(group.results for group in scored.groups)
        return results
