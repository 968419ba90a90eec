import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.parsing import extract_structured, normalize_query, parse_query_list


def test_extracts_three_parts():
    text = "<summary> S </summary>\n<outline>1. A\n2. B</outline><answer>Body</answer>"
    parsed = extract_structured(text)
    assert (parsed.summary, parsed.outline, parsed.answer) == ("S", "1. A\n2. B", "Body")


def test_extraction_tolerates_case_and_whitespace_in_tags():
    parsed = extract_structured("<SUMMARY>s</Summary ><  outline >o</ outline><Answer>a</ANSWER>")
    assert parsed is not None and parsed.answer == "a"


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "plain text with no tags",
        "<summary>s</summary><outline>o</outline>",  # no answer
        "<summary>s</summary><outline>o</outline><answer>unterminated",
        "<summary> </summary><outline>o</outline><answer>a</answer>",  # empty part
        "<summary>s<outline>o</outline><answer>a</answer>",  # summary never closed
    ],
)
def test_missing_or_empty_parts_are_unparsed(text):
    assert extract_structured(text) is None


def test_chinese_content_is_kept():
    parsed = extract_structured("<summary>摘要</summary><outline>一、背景</outline><answer>正文内容</answer>")
    assert parsed.summary == "摘要" and parsed.answer == "正文内容"


def test_query_list_python_literal_inside_prose():
    text = (
        "Sure! Here they are:\ngenerated_query = ['Write a report on A', \"Draft a brief on B\"]\nqueries.extend(generated_query)"
    )
    assert parse_query_list(text) == ["Write a report on A", "Draft a brief on B"]


def test_query_list_json_in_fence():
    text = 'Output:\n```json\n["请撰写一份报告", "Write a memo"]\n```'
    assert parse_query_list(text) == ["请撰写一份报告", "Write a memo"]


def test_query_list_numbered_lines_fallback():
    text = "1. Write a report on grid reform\n2) Draft a speech\nquery #3: Summarize the policy\n- Another one\nnot a query"
    assert parse_query_list(text) == [
        "Write a report on grid reform",
        "Draft a speech",
        "Summarize the policy",
        "Another one",
    ]


def test_query_list_never_evaluates_code():
    text = "[__import__('os').system('echo pwned')]"
    assert parse_query_list(text) == []


@pytest.mark.parametrize("text", ["", "[", "]", "[1, 2, 3]", "[[", "{'a': 1}", "[None]", "queries = ["])
def test_query_list_malformed_gives_no_queries(text):
    assert parse_query_list(text) == []


def test_query_list_dedupes_and_strips():
    assert parse_query_list("['a ', 'a', ' b', '']") == ["a", "b"]


def test_query_list_nested_brackets_in_strings():
    assert parse_query_list("x = ['Report [draft] on A', 'B'] trailing ] bracket") == ["Report [draft] on A", "B"]


@given(st.text(max_size=300))
def test_parsers_never_raise(text):
    assert isinstance(parse_query_list(text), list)
    extract_structured(text)


def test_normalize_query():
    assert normalize_query("  Write   A\nReport ") == normalize_query("write a report")
