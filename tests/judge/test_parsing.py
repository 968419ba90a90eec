"""Judge-answer parsing on realistic outputs, clean and broken."""

from __future__ import annotations

import json

import pytest

from services.judge.parsing import (
    JudgeParseError,
    judgement_json_schema,
    pairwise_json_schema,
    parse_judgement,
    parse_pairwise,
    score_value,
)
from shared.prompts import JUDGE_CRITERIA_KEYS

SCORES = {
    "Content Accuracy and Relevance": 8,
    "Tone and Formality": 9,
    "Idea Development and Argumentation": 6,
    "Structure and Clarity": 7,
    "Persuasiveness and Effectiveness": 5,
}
EXPECTED = {
    "content_accuracy_relevance": 8,
    "tone_formality": 9,
    "idea_development_argumentation": 6,
    "structure_clarity": 7,
    "persuasiveness_effectiveness": 5,
}


def answer(analysis: str = "Solid structure, weak evidence.", **overrides) -> dict:
    return {"Analysis": analysis, **SCORES, **overrides}


def test_plain_json_gives_criteria_analysis_and_score():
    result = parse_judgement(json.dumps(answer()))
    assert result.criteria.model_dump() == EXPECTED
    assert result.analysis == "Solid structure, weak evidence."
    assert result.score == pytest.approx(70.0)  # mean (35 / 5 = 7) x 10


def test_fenced_json_with_prose_around_it():
    text = (
        "Overall, the report follows the outline but lacks policy citations.\n\n"
        "```json\n" + json.dumps(answer(), indent=2, ensure_ascii=False) + "\n```\n"
        "Let me know if you need a more detailed breakdown."
    )
    assert parse_judgement(text).criteria.model_dump() == EXPECTED


def test_trailing_text_with_braces_after_the_object():
    text = json.dumps(answer()) + "\n\nNote: scores use the {1..10} scale; {see rubric"
    assert parse_judgement(text).criteria.model_dump() == EXPECTED


def test_last_json_object_wins_over_an_earlier_draft():
    draft = answer("draft", **{"Tone and Formality": 3})
    final = answer("final")
    text = f"First pass: {json.dumps(draft)}\nOn reflection, revised:\n{json.dumps(final)}"
    result = parse_judgement(text)
    assert result.analysis == "final"
    assert result.criteria.tone_formality == 9


def test_an_incomplete_last_object_falls_back_to_the_complete_one():
    text = json.dumps(answer("complete")) + '\nSummary: {"Tone and Formality": 9}'
    assert parse_judgement(text).analysis == "complete"


def test_single_quotes_trailing_comma_and_raw_newlines_in_strings():
    python_style = "{'Analysis': 'ok', " + ", ".join(f"'{k}': {v}" for k, v in SCORES.items()) + ",}"
    assert parse_judgement(python_style).criteria.model_dump() == EXPECTED
    raw_newline = '{"Analysis": "line one\nline two", ' + ", ".join(f'"{k}": {v}' for k, v in SCORES.items()) + "}"
    result = parse_judgement(raw_newline)
    assert result.analysis == "line one\nline two"


def test_string_scores_fractions_nested_scores_and_key_variants():
    text = json.dumps(
        {
            "analysis": "nested",
            "scores": {
                "Content Accuracy & Relevance": "8/10",
                "tone_formality": "9",
                "IDA": 6.0,
                "Structure and Clarity": {"score": 7, "reason": "clear headings"},
                "Persuasiveness and Effectiveness": 5,
            },
        }
    )
    result = parse_judgement(text)
    assert result.criteria.model_dump() == EXPECTED
    assert result.analysis == "nested"


def test_half_points_round_half_up():
    assert score_value("tone_formality", 7.5) == 8
    assert score_value("tone_formality", "6.4") == 6


def test_per_criterion_fallback_on_markdown_lines():
    text = (
        "**Analysis:** The document is formal and well organised, but several claims are unsupported.\n\n"
        "- **Content Accuracy & Relevance**: 8/10\n"
        "- **Tone and Formality** (TF): 9\n"
        "- Idea Development and Argumentation - 6\n"
        "- Structure_and_Clarity = 7\n"
        "- Persuasiveness and Effectiveness score: 5 out of 10\n"
    )
    result = parse_judgement(text)
    assert result.criteria.model_dump() == EXPECTED
    assert result.analysis.startswith("The document is formal")
    assert "Content" not in result.analysis


def test_fallback_uses_the_last_mention_of_each_criterion():
    text = "Tone and Formality: 3 was my first impression, but revisiting it:\n" + "\n".join(
        f"{k}: {v}" for k, v in SCORES.items()
    )
    assert parse_judgement(text).criteria.tone_formality == 9


def test_truncated_json_still_parses_when_every_score_was_written():
    text = json.dumps(answer())[:-1] + ', "Extra'  # cut at max_tokens after the last score
    assert parse_judgement(text).criteria.model_dump() == EXPECTED


def test_reasoning_block_is_ignored():
    draft = json.dumps(answer(**{"Tone and Formality": 2}))
    text = f"<think>maybe {draft}</think>\n" + json.dumps(answer())
    assert parse_judgement(text).criteria.tone_formality == 9


@pytest.mark.parametrize("bad", [0, 11, -3, 10.6])
def test_out_of_range_is_an_error_naming_the_criterion(bad):
    with pytest.raises(JudgeParseError, match=r"tone_formality.*outside 1-10"):
        parse_judgement(json.dumps(answer(**{"Tone and Formality": bad})))


def test_missing_criterion_is_named():
    partial = answer()
    del partial["Structure and Clarity"]
    with pytest.raises(JudgeParseError, match="structure_clarity"):
        parse_judgement(json.dumps(partial))


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("I cannot evaluate this response.", "no JSON object"),
        ('{"Analysis": "fine", "Tone and Formality": "excellent"}', "not a number|lacks criteria"),
        (json.dumps({"Analysis": "x", **{k: True for k in SCORES}}), "not a number"),
        (json.dumps({"verdict": "good"}), "none of the five criteria"),
    ],
)
def test_unjudgeable_answers_raise_with_a_reason(text, reason):
    with pytest.raises(JudgeParseError, match=reason):
        parse_judgement(text)


def test_analysis_is_truncated():
    result = parse_judgement(json.dumps(answer("x" * 50)), max_analysis_chars=10)
    assert result.analysis == "x" * 10


def test_schema_lists_every_prompt_key_in_order_with_integer_scores():
    schema = judgement_json_schema(500)
    assert list(schema["properties"]) == ["Analysis", *JUDGE_CRITERIA_KEYS]
    assert schema["required"] == list(schema["properties"])
    assert schema["properties"]["Analysis"]["maxLength"] == 500
    assert schema["properties"]["Tone and Formality"]["enum"] == list(range(1, 11))
    assert "maxLength" not in judgement_json_schema(0)["properties"]["Analysis"]


# ----------------------------------------------------------------------------------------------- pairwise


@pytest.mark.parametrize(
    "text, winner",
    [
        ('{"Analysis": "A covers more.", "Winner": "A"}', "A"),
        ('Draft: {"Winner": "A"}\nFinal:\n```json\n{"analysis": "on reflection", "winner": "Response B"}\n```', "B"),
        ("{'Analysis': 'equal', 'Verdict': 'Tie'}", "tie"),
        ("Assistant A is more formal, B more complete. Final verdict: [[B]]", "B"),
        ("Neither stands out. [[C]]", "tie"),
        ('<think>{"Winner": "B"}</think>{"Analysis": "x", "Winner": "a"}', "A"),
    ],
)
def test_pairwise_verdicts_in_json_or_fastchat_brackets(text, winner):
    assert parse_pairwise(text).winner == winner


def test_pairwise_analysis_is_kept_and_truncated():
    verdict = parse_pairwise('{"Analysis": "' + "y" * 50 + '", "Winner": "B"}', max_analysis_chars=10)
    assert (verdict.winner, verdict.analysis) == ("B", "y" * 10)
    assert parse_pairwise("B is stronger on evidence.\n[[B]]").analysis == "B is stronger on evidence."


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ('{"Analysis": "A is better", "Winner": "first"}', "'first' is not A, B or tie"),
        (json.dumps(SCORES), "no Winner"),
        ("A is clearly better.", r"no \[\[A\]\], \[\[B\]\] or \[\[C\]\] verdict"),
    ],
)
def test_unreadable_pairwise_answers_raise_with_a_reason(text, reason):
    with pytest.raises(JudgeParseError, match=reason):
        parse_pairwise(text)


def test_pairwise_schema_allows_a_b_or_tie():
    schema = pairwise_json_schema(300)
    assert schema["required"] == ["Analysis", "Winner"]
    assert schema["properties"]["Winner"]["enum"] == ["A", "B", "tie"]
    assert schema["properties"]["Analysis"]["maxLength"] == 300
