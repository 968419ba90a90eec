"""The benchmarks' shared writer: the exact Markdown table, the JSON record, a figure that never fails the bench."""

import json

from shared.bench_report import markdown_table, save_figure, write_json, write_markdown


def test_markdown_table_is_the_readme_shape(tmp_path):
    table = write_markdown(tmp_path / "b.md", ["method", "tokens/s"], [["grace", 12.5], ["trl", 3]])
    assert table == "| method | tokens/s |\n|---|---|\n| grace | 12.5 |\n| trl | 3 |"
    assert (tmp_path / "b.md").read_text() == table + "\n"
    assert markdown_table(["a"], []) == "| a |\n|---|"


def test_json_and_figure(tmp_path):
    write_json(tmp_path / "sub" / "b.json", {"x": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": [1, 2]}
    assert save_figure(tmp_path / "b.png", lambda ax: ax.bar(["a", "b"], [1, 2]))
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def broken(ax):
        raise ValueError("no data")

    assert save_figure(tmp_path / "c.png", broken) is False and not (tmp_path / "c.png").exists()
