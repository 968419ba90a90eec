"""The one JSONL reader and writer."""

from __future__ import annotations

import pytest

from shared.jsonl import read_jsonl, read_queries, write_jsonl


def test_round_trip_skips_blank_lines_and_keeps_unicode(tmp_path):
    path = write_jsonl(tmp_path / "sub" / "rows.jsonl", [{"query": "国企改革"}, {"query": "b", "lang": "zh"}])
    path.write_text(path.read_text() + "\n\n")
    assert read_jsonl(path) == [{"query": "国企改革"}, {"query": "b", "lang": "zh"}]
    assert not list(tmp_path.glob("sub/*.tmp"))  # written whole, then renamed


def test_query_files_get_ids_and_langs_and_a_limit(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": "a"}, {"query": "b", "id": "x", "lang": "zh"}, {"query": "c"}])
    rows = read_queries(path, limit=2)
    assert [(r["id"], r["lang"], r["query"]) for r in rows] == [("q1", "en", "a"), ("x", "zh", "b")]


@pytest.mark.parametrize(("text", "message"), [
    ('{"query": "a"}\n{not json\n', r"q.jsonl:2: not JSON"),
    ('["a"]\n', r"q.jsonl:1: each line must be a JSON object"),
    ('{"query": "  "}\n', r"record 1: each line needs a non-empty 'query'"),
])  # fmt: skip
def test_errors_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_queries(path)
