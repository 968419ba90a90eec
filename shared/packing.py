"""Sequences packed into forward passes under a token budget: the reward's model batches, the trainer's micro-batches."""


def token_budget_batches(lengths: list[int], max_tokens: int, max_waste: float = 0.1) -> list[list[int]]:
    """Positions 0..len-1 packed into batches for one forward each, longest first.

    A batch pads its members to its first (longest) length; a member joins only while
    ``count * longest <= max_tokens`` and the padding stays within ``max_waste`` of the real tokens:
    padded positions are pure compute waste, and a long sequence alone already runs near the matmul bound.
    A sequence longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0
    for index in order:
        if batches:
            count, longest = len(batches[-1]) + 1, lengths[batches[-1][0]]
            joined = real + lengths[index]
            if count * longest <= max_tokens and count * longest - joined <= max_waste * joined:
                batches[-1].append(index)
                real = joined
                continue
        batches.append([index])
        real = lengths[index]
    return batches
