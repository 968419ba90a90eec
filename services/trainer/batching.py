"""Pure planning of an epoch: batch order, padding-free micro-batches, LR schedule.

The optimizer batch is drawn at random, as any trainer does; only its
*execution* is reordered: sequences of one batch are sorted by length and cut
into micro-batches whose padded size stays within a token budget (``shared.packing``),
and the gradients of the micro-batches are summed. The loss is a batch mean of
per-sequence terms (z_ref being computed first and detached), so the step is
the same as one padded forward of the whole batch, minus the padding.
"""

from __future__ import annotations

import math
import random


def plan_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """A seeded random permutation of range(n) cut into batches (the last may be short)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def mismatched_partners(batch: list[int]) -> list[int]:
    """For KTO's KL estimate: sample k of a batch is paired with the response of sample k-1 (rotation by one, as TRL)."""
    return [batch[-1]] + batch[:-1]


def cosine_lr(step: int, total_steps: int, peak: float, floor: float, warmup_ratio: float) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up to ``peak``, then cosine to ``floor`` (paper 4.1)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(total_steps - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def iteration_steps(samples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of one iteration: ``epochs`` passes of ceil(samples / batch_size) batches."""
    return epochs * math.ceil(samples / batch_size)


def run_schedule(steps_per_iteration: list[int], iteration: int, steps_done: int | None = None) -> tuple[int, int]:
    """(step offset, steps after) of ``iteration`` on a run-long cosine (``lr_schedule="run"``).

    The offset is the steps done in earlier iterations: ``steps_done`` when the
    carried optimizer state recorded it, else the estimate for iterations < ``iteration``.
    "Steps after" is the estimate for the later iterations. The run's total is
    offset + this iteration's (actual) steps + steps after, so the schedule at
    global step offset + k is ``cosine_lr(offset + k, total, ...)``.
    """
    offset = sum(steps_per_iteration[:iteration]) if steps_done is None else steps_done
    return offset, sum(steps_per_iteration[iteration + 1 :])
