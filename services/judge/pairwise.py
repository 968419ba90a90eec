"""Pairwise verdicts in both orders -> one judgment. Pure.

A judge that prefers whichever response it reads first (position bias) names different winners when the
pair is swapped. As in FastChat's MT-bench judge, such an inconsistent pair counts as a tie; a pair with an
unparsed game has no winner, since one order alone cannot show the bias.
"""

from __future__ import annotations

from typing import Literal

from services.judge.protocol import PairwiseGame, PairwiseJudgment, Winner

Order = Literal["ab", "ba"]


def game_winner(position: Literal["A", "B", "tie"], order: Order) -> Winner:
    """The winner in the request's terms: in the ``ba`` game, position A showed response_b."""
    if position == "tie":
        return "tie"
    first, second = ("a", "b") if order == "ab" else ("b", "a")
    return first if position == "A" else second


def combine_games(ab: PairwiseGame, ba: PairwiseGame) -> PairwiseJudgment:
    if ab.winner is None or ba.winner is None:
        winner, consistent = None, None
    else:
        consistent = ab.winner == ba.winner
        winner = ab.winner if consistent else "tie"
    return PairwiseJudgment(
        winner=winner, consistent=consistent, games=[ab, ba], usage=ab.usage + ba.usage, cached=ab.cached and ba.cached
    )
