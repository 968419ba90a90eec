"""The group-calibrated reward as a ``compute_score`` for verl's batch reward manager.

verl (``reward_model.reward_manager=batch``) calls
``compute_score(data_sources=..., solution_strs=..., ground_truths=..., extra_infos=..., **reward_kwargs)``
once per batch (numpy object arrays or lists, one entry per response) and takes back one float or one dict
with a ``"score"`` key per response; the other keys of the dicts are logged as ``reward_extra_info``.

verl does not pass the prompt, so it is read from each ``extra_infos[i]``: its ``"prompt"`` key, else its
``"question"`` key (the key verl's own data preprocessing scripts write). Responses that share a prompt
form a group. The batch goes to the reward service's ``POST /get_reward`` (OpenRLHF's shape: ``query`` =
prompt + response, ``prompts`` = prompt), which groups, scores and calibrates exactly as ``/v1/score``.

Standard library only, so verl can load this file by path (``custom_reward_function.path``) in an
environment where this project is not installed.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

PROMPT_KEYS = ("prompt", "question")  # looked up in this order in each extra_info
SIGNALS = ("z", "weight")
DEFAULT_URL_ENV = "GRACE_REWARD_URL"
API_KEY_ENV = "GRACE_REWARD_API_KEY"


def prompt_of(extra_info: Any, index: int) -> str:
    """The prompt of response ``index``: ``extra_info["prompt"]``, else ``extra_info["question"]``."""
    if isinstance(extra_info, Mapping):
        for key in PROMPT_KEYS:
            value = extra_info.get(key)
            if isinstance(value, str) and value:
                return value
    raise ValueError(
        f"extra_infos[{index}] has no non-empty string under {' or '.join(map(repr, PROMPT_KEYS))}: the GRACE reward "
        "groups responses by prompt, and verl passes the prompt only through extra_info (got "
        f"{type(extra_info).__name__})"
    )


def prompt_batches(prompts: Sequence[str], max_groups: int) -> list[list[int]]:
    """Response indices in requests of at most ``max_groups`` whole prompt groups (a group is never split)."""
    order: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        order.setdefault(prompt, []).append(i)
    groups = list(order.values())
    return [[i for group in groups[b : b + max_groups] for i in group] for b in range(0, len(groups), max_groups)]


def _post(url: str, body: dict, api_key: str | None, timeout: float, attempts: int) -> dict:
    """POST JSON; a 503 (busy or loading) is retried after its Retry-After, any other error raised with the
    service's message."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode()
    for _ in range(attempts):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            if exc.code == 503:
                time.sleep(float(exc.headers.get("Retry-After") or 2))
                continue
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise RuntimeError(f"{url} answered {exc.code}: {detail[:500]}") from None
    raise RuntimeError(f"{url} still busy (503) after {attempts} attempts")


def compute_score(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any] | None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    signal: str = "z",
    max_groups_per_request: int = 64,
    timeout: float = 600.0,
    attempts: int = 30,
    **kwargs: Any,
) -> list[dict[str, float]]:
    """One dict per response: ``score`` plus ``weight``, ``parsed``, ``rank_sum``, ``zero_variance_group``
    and each metric by symbol (L, E, P, PPL_G, PPL_D, Rs, Rd; 0 when unparsed).

    ``score`` is the group Z (``signal="z"``, default: higher is better, mean 0 over a group's parsed
    responses; an unparsed response gets 1 less than its group's lowest Z) or the calibrated weight W
    (``signal="weight"``, -1 when unparsed). ``url`` is the reward service's base URL (default: env
    ``GRACE_REWARD_URL``), ``api_key`` its bearer key (default: env ``GRACE_REWARD_API_KEY``). A batch with
    more than ``max_groups_per_request`` prompts (the service's ``max_groups``) is sent in several requests of
    whole groups; Z does not depend on the split, W is calibrated over each request. ``data_sources`` and
    ``ground_truths`` are not used; other keyword arguments verl passes are ignored.
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, not {signal!r}")
    base = url or os.environ.get(DEFAULT_URL_ENV)
    if not base:
        raise ValueError(
            f"no reward service URL: pass url= (verl: custom_reward_function.reward_kwargs.url) or set {DEFAULT_URL_ENV}"
        )
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    responses = [str(s) for s in solution_strs]
    infos = list(extra_infos) if extra_infos is not None else [None] * len(responses)
    if len(infos) != len(responses):
        raise ValueError(f"extra_infos has {len(infos)} entries for {len(responses)} solution_strs")
    prompts = [prompt_of(info, i) for i, info in enumerate(infos)]
    endpoint = base.rstrip("/") + "/get_reward"
    results: list[dict[str, float] | None] = [None] * len(responses)
    for batch in prompt_batches(prompts, max_groups_per_request):
        body = {"query": [prompts[i] + responses[i] for i in batch], "prompts": [prompts[i] for i in batch]}
        answer = _post(endpoint, body, api_key, timeout, attempts)
        logs = answer["extra_logs"]
        for k, i in enumerate(batch):
            score = answer["rewards"][k] if signal == "z" else answer["scores"][k]
            results[i] = {
                "score": float(score),
                "weight": float(answer["scores"][k]),
                **{name: float(v[k]) for name, v in logs.items()},
            }
    return results  # type: ignore[return-value]
