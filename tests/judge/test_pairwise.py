"""Pure pairwise logic: positions -> winners, two games -> one judgment; the prompts built from appendix E."""

from __future__ import annotations

import pytest

from services.judge.pairwise import combine_games, game_winner
from services.judge.prompts import judge_prompt, pairwise_prompt
from services.judge.protocol import PairwiseGame, Usage
from shared.prompts import judge_prompt as appendix_e_prompt


def game(order: str, winner: str | None, cached: bool = False) -> PairwiseGame:
    usage = Usage.priced(100, 20, prompt_per_1m=1.0, completion_per_1m=4.0)
    return PairwiseGame(order=order, winner=winner, usage=usage, cached=cached)


@pytest.mark.parametrize(
    "position, order, winner",
    [("A", "ab", "a"), ("B", "ab", "b"), ("A", "ba", "b"), ("B", "ba", "a"), ("tie", "ab", "tie"), ("tie", "ba", "tie")],
)
def test_positions_map_back_to_the_request(position, order, winner):
    assert game_winner(position, order) == winner


@pytest.mark.parametrize(
    "ab, ba, winner, consistent",
    [
        ("a", "a", "a", True),
        ("b", "b", "b", True),
        ("tie", "tie", "tie", True),
        ("a", "b", "tie", False),  # each order preferred the response shown first
        ("a", "tie", "tie", False),
        (None, "a", None, None),
        ("b", None, None, None),
    ],
)
def test_two_games_make_one_judgment(ab, ba, winner, consistent):
    result = combine_games(game("ab", ab), game("ba", ba))
    assert (result.winner, result.consistent) == (winner, consistent)
    assert [g.order for g in result.games] == ["ab", "ba"]


def test_usage_adds_up_and_cached_needs_both_games():
    result = combine_games(game("ab", "a", cached=True), game("ba", "a"))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (200, 40, 240)
    assert result.usage.cost == pytest.approx(2 * (100 * 1.0 + 20 * 4.0) / 1e6)
    assert not result.cached and combine_games(game("ab", "a", True), game("ba", "a", True)).cached


def test_without_a_reference_the_prompt_is_appendix_e_verbatim():
    instruction, response = "写一份{报告}", "含 {花括号} 的正文"
    assert judge_prompt(instruction, response) == appendix_e_prompt(instruction, response)
    assert "<Reference Answer>" not in judge_prompt(instruction, response, reference="")


def test_pairwise_prompt_shows_both_responses_under_the_five_criteria():
    prompt = pairwise_prompt("写报告", "first text", "second text", reference="ref")
    assert prompt.index("<Response A>first text</Response A>") < prompt.index("<Response B>second text</Response B>")
    assert "5. Persuasiveness and Effectiveness" in prompt and "position bias" in prompt
    assert prompt.index("<Reference Answer>ref</Reference Answer>") < prompt.index("Instructions:")
